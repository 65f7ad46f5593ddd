"""Each patch in patches/ applies cleanly to `pretrain_gpt.py` of the Megatron-LM release it
names (`pretrain_gpt-<git revision>.patch`), read from the MEGATRON_LM_PATH checkout's git."""

import os
import subprocess
from pathlib import Path

import pytest

from conftest import REPO

MEGATRON_LM = os.environ.get("MEGATRON_LM_PATH")
PATCHES = sorted((REPO / "patches").glob("pretrain_gpt-*.patch"))


def test_there_is_a_patch_for_the_last_release_and_for_main():
    names = {p.stem for p in PATCHES}
    assert "pretrain_gpt-core_v0.16.1" in names
    assert any(n.startswith("pretrain_gpt-main-") for n in names)


@pytest.mark.skipif(not MEGATRON_LM, reason="MEGATRON_LM_PATH (a Megatron-LM git checkout) is not set")
@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.stem)
def test_patch_applies_to_its_release(patch, tmp_path):
    revision = patch.stem.removeprefix("pretrain_gpt-").removeprefix("main-")
    show = subprocess.run(["git", "-C", MEGATRON_LM, "show", f"{revision}:pretrain_gpt.py"],
                          capture_output=True, text=True)
    if show.returncode != 0:
        pytest.skip(f"{revision} is not in the checkout's history: {show.stderr.strip()}")
    Path(tmp_path, "pretrain_gpt.py").write_text(show.stdout)
    check = subprocess.run(["git", "apply", "--check", str(patch)], cwd=tmp_path,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
