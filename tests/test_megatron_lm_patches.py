"""Each patch in patches/ applies cleanly to `pretrain_gpt.py` of the Megatron-LM revision it
names (`pretrain_gpt-<tag>.patch`, `pretrain_gpt-main-<commit>.patch`), read from the
MEGATRON_LM_PATH checkout's git; and the patched script of the checked-out revision installs
the hooks when it is imported."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

MEGATRON_LM = os.environ.get("MEGATRON_LM_PATH")
PATCHES = sorted((REPO / "patches").glob("pretrain_gpt-*.patch"))
needs_checkout = pytest.mark.skipif(not MEGATRON_LM, reason="MEGATRON_LM_PATH (a Megatron-LM git checkout) is not set")


def revision(patch: Path) -> str:
    return patch.stem.removeprefix("pretrain_gpt-").removeprefix("main-")


def git(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", MEGATRON_LM, *args], capture_output=True, text=True)


def test_there_is_a_patch_for_each_supported_release_and_for_main():
    names = {p.stem for p in PATCHES}
    assert {"pretrain_gpt-core_v0.16.1", "pretrain_gpt-core_v0.19.0"} <= names
    assert any(n.startswith("pretrain_gpt-main-") for n in names)


@needs_checkout
@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.stem)
def test_patch_applies_to_its_release(patch, tmp_path):
    show = git("show", f"{revision(patch)}:pretrain_gpt.py")
    if show.returncode != 0:
        pytest.skip(f"{revision(patch)} is not in the checkout's history: {show.stderr.strip()}")
    Path(tmp_path, "pretrain_gpt.py").write_text(show.stdout)
    check = subprocess.run(["git", "apply", "--check", str(patch)], cwd=tmp_path,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


@needs_checkout
def test_the_patched_script_of_this_checkout_installs_the_hooks(tmp_path):
    from test_megatron_lm_pretrain import MISSING, _needs_python_312

    if MISSING or _needs_python_312():
        pytest.skip(f"importing Megatron-LM's training code needs {MISSING or 'Python >= 3.12'}")
    head = git("rev-parse", "HEAD").stdout.strip()
    if not head:
        # Outside git every rev-parse prints nothing, so every patch would "name" it.
        pytest.skip(f"{MEGATRON_LM} is not a git checkout: cannot tell its revision")
    mine = [p for p in PATCHES if git("rev-parse", f"{revision(p)}^{{commit}}").stdout.strip() == head]
    if not mine:
        pytest.skip(f"no patch names the checked-out revision {head[:10]}")
    script = tmp_path / "pretrain_gpt.py"
    script.write_text((Path(MEGATRON_LM) / "pretrain_gpt.py").read_text())
    subprocess.run(["git", "apply", str(mine[0])], cwd=tmp_path, check=True)
    probe = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; import pretrain_gpt; "
             "from megatron.training import checkpointing; "
             "print(checkpointing.generate_state_dict.__qualname__)")
    done = subprocess.run([sys.executable, "-c", probe, str(tmp_path), MEGATRON_LM],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])))
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Integration" in done.stdout.splitlines()[-1]
