import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(script: str, nproc: int, *args, timeout: int = 900, python: str = sys.executable) -> str:
    """Run `tests/workers/<script>` on `nproc` gloo ranks with torchrun (of `python`); fail with
    its output."""
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS), os.environ.get("PYTHONPATH", "")]))
    cmd = [python, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={_free_port()}", str(TESTS / "workers" / script), *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f"{script} failed (rc {proc.returncode}):\n{out[-12000:]}")
    return out


@pytest.fixture(scope="session")
def ranks():
    return run_ranks


@pytest.fixture(scope="session")
def offline_sources(tmp_path_factory):
    """OUT/src (scenarios.SPEC at TP2, model-space optimizer state, iteration 5) and
    OUT/src-mixed (a mixed dense/MoE stack, iteration 3), saved by megatron-core. Read only:
    tests write their outputs beside them under new names."""
    out = tmp_path_factory.mktemp("sources")
    run_ranks("offline_roundtrip.py", 2, "source", out)
    return out
