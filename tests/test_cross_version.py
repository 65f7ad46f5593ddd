"""Checkpoints saved by one megatron-core line and grown by the other (0.16.1 ↔ 0.19.2).

The source is saved by the *other* line's Python (MEGATRON_RECYCLE_OTHER_PYTHON, which
scripts/test.sh sets to the other venv), then read, grown and loaded here:
- both lines grow it offline to the same tensors, bit for bit, and `verify` passes here;
- the grown checkpoint (written here in this line's common-state form) loads with plain
  megatron-core here at three layouts, equal to what the load hook gives, where this line's
  megatron-core can open the source at all: 0.19 opens both forms, 0.16-0.18 only common.pt.
  Where it cannot, growth through Megatron-LM or the reference loop refuses it up front.
"""

import json
import os
import subprocess

import pytest
import torch

import ckpt_tools
from conftest import run_ranks
from megatron_recycle.errors import GrowthError
from test_offline_tools import GROW_FLAGS, cli, offline_tools_import_megatron_core

OTHER = os.environ.get("MEGATRON_RECYCLE_OTHER_PYTHON")
pytestmark = pytest.mark.skipif(
    not OTHER or not os.path.exists(OTHER),
    reason="needs the other megatron-core line's Python in MEGATRON_RECYCLE_OTHER_PYTHON "
           "(bash scripts/test.sh makes both venvs and sets it)")


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    out = tmp_path_factory.mktemp("cross")
    run_ranks("offline_roundtrip.py", 2, "source", out, python=OTHER)
    there = subprocess.run([OTHER, "-m", "megatron_recycle.cli", "grow", "--load", out / "src",
                            "--save", out / "grown-there", *GROW_FLAGS], capture_output=True, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert there.returncode == 0, there.stderr[-4000:]
    cli("grow", "--load", out / "src", "--save", out / "grown-here", *GROW_FLAGS)
    return out


def test_the_other_lines_checkpoint_reads_here(other):
    s = json.loads(cli("inspect", other / "src", "--json").stdout)
    assert s["iteration"] == 5 and s["architecture"]["num_layers"] == 4
    assert s["architecture"]["topk"] == 2 and s["optimizer_format"] == "fully_reshardable"
    r = json.loads(cli("plan", "--load", other / "src", *GROW_FLAGS, "--json").stdout)
    assert r["layers"] == [4, 8] and r["topk"] == [2, 4]


def test_the_offline_tools_start_without_megatron_core_on_the_other_lines_form(other, tmp_path):
    assert offline_tools_import_megatron_core(other / "src", tmp_path) == []


def test_both_lines_grow_it_to_the_same_tensors_bit_for_bit(other):
    here = ckpt_tools.read_checkpoint(other / "grown-here" / "iter_0000005")
    there = ckpt_tools.read_checkpoint(other / "grown-there" / "iter_0000005")
    assert here.keys() == there.keys() and len(here) > 50
    assert all(here[k].dtype == there[k].dtype and torch.equal(here[k], there[k]) for k in here)
    assert "verify: OK" in cli("verify", "--source", other / "src", "--grown", other / "grown-here").stdout
    args = ckpt_tools.common_state(other / "grown-here")["args"]
    assert (args.num_layers, args.num_experts, args.moe_router_topk) == (8, 8, 4)


def test_the_grown_checkpoint_loads_here_as_the_load_hook_grows_it(other):
    from megatron_recycle import compat

    src = other / "src" / "iter_0000005"
    hook_can_open = compat.saves_common_state_object() or (src / compat.COMMON_STATE_FILE).exists()
    run_ranks("offline_roundtrip.py", 2, "compare", src, other / "grown-here" / "iter_0000005", other,
              *([] if hook_can_open else ["plain"]))
    counts = json.loads((other / "compare.json").read_text())
    assert set(counts) == {"ep2", "tp2", "pp2"} and min(counts.values()) > 100, counts
    if not hook_can_open:
        from test_megatron_lm import configure

        with pytest.raises(GrowthError, match="saved by megatron-core 0.19 or later.*megatron-recycle grow"):
            configure(["--load", str(other / "src"), "--grow-experts", "2", "--grow-optimizer", "reset"])
