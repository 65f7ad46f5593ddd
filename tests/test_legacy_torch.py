"""Legacy `torch` checkpoints (Megatron-LM's --ckpt-format torch) as sources of the offline
tools: read as the torch_dist checkpoint of the same model, grown into torch_dist."""

import json
import os
import shutil

import pytest
import torch

import ckpt_tools
from megatron_recycle.io.safe_pickle import torch_load
from scenarios import LEGACY_SOURCES
from test_offline_tools import GROW_FLAGS, cli

ITER = "iter_0000005"
EXACT_FLAGS = ["--grow-depth", "2", "--grow-zero-init-copies", "--grow-experts", "2",
               "--grow-noise-alpha", "0"]


@pytest.fixture(scope="module")
def legacy(ranks, tmp_path_factory):
    out = tmp_path_factory.mktemp("legacy")
    ranks("legacy_torch.py", 4, "save", out)
    return out


def test_the_source_is_laid_out_as_megatron_lm_writes_it(legacy):
    names = {name: sorted(p.name for p in (legacy / f"{name}-torch" / ITER).iterdir()) for name in LEGACY_SOURCES}
    tp_and_pp_or_ep = ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    assert names == {"tp2-pp2": tp_and_pp_or_ep, "tp2-ep2": tp_and_pp_or_ep,
                     "pp2-vpp2-ep2-mixed": ["mp_rank_00_000_000", "mp_rank_00_000_001",
                                            "mp_rank_00_001_000", "mp_rank_00_001_001"]}
    local = torch_load(legacy / "tp2-ep2-torch" / ITER / "mp_rank_01_001" / "model_optim_rng.pt")["model"]
    assert "decoder.layers.3.mlp.experts.local_experts.1.linear_fc1.weight" in local
    mixed = legacy / "pp2-vpp2-ep2-mixed-torch" / ITER
    first, second = (torch_load(mixed / f"mp_rank_00_00{pp}_001" / "model_optim_rng.pt") for pp in (0, 1))
    # virtual stage major: layers 0 and 2 (MoE) on the first stage, 1 and 3 (dense) on the second
    assert all("decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight" in first[m] for m in ("model0", "model1"))
    assert all("decoder.layers.0.mlp.linear_fc1.weight" in second[m] for m in ("model0", "model1"))


@pytest.mark.parametrize("name", sorted(LEGACY_SOURCES))
def test_reader_gives_the_torch_dist_checkpoint_of_the_same_model(legacy, name):
    """Keys, global shapes, every element and the extra-state objects: TP shards joined (GLU
    gate/up parts apart), PP stages (uneven, virtual) and EP ranks renumbered, layers stacked or
    keyed by number, as megatron-core's sharded_state_dict defines them."""
    from megatron_recycle import indexing
    from megatron_recycle.io.checkpoint import CheckpointInfo
    from megatron_recycle.io.reader import box_request
    from megatron_recycle.mapping import Box

    info = CheckpointInfo.read(legacy / f"{name}-torch")
    want = ckpt_tools.read_checkpoint(legacy / f"{name}-dist" / ITER)
    assert info.format == "torch" and info.path.name == ITER and info.iteration == 5
    assert info.shapes == {k: tuple(t.shape) for k, t in want.items()}
    got = info.read_boxes({k: box_request(Box(k, s, (), (0,) * len(s), s), info.dtypes[k])
                           for k, s in info.shapes.items()})
    different = [k for k, t in want.items() if not torch.equal(got[k], t)]
    assert not different, different
    unit = next(k for k in info.shapes if k.endswith("experts.experts.linear_fc1.weight"))
    shape = info.shapes[unit]  # a slice of the last expert of a layer
    index = tuple(n - 1 for n in shape[:indexing.stored_prepend_axes(unit)])
    box = Box(unit, shape, index, (5, 0), (11, shape[-1]))
    assert torch.equal(info.read_boxes({0: box_request(box, torch.float32)})[0], want[unit][index][5:16])
    assert info.optimizer_format == "legacy torch, per rank" and "args" in info.common
    objects = CheckpointInfo.read(legacy / f"{name}-dist").objects  # the modules' extra states
    assert sorted(info.objects) == sorted(objects) and len(objects) > 10


@pytest.fixture(scope="module")
def grown_pp(legacy):
    before = ckpt_tools.tree_digest(legacy / "tp2-pp2-torch")
    log = cli("grow", "--load", legacy / "tp2-pp2-torch", "--save", legacy / "grown-pp", *GROW_FLAGS,
              "--batch-size-mb", 0.05).stderr
    cli("grow", "--load", legacy / "tp2-pp2-dist", "--save", legacy / "grown-pp-dist", *GROW_FLAGS)
    return legacy, before, log


def test_growth_of_a_legacy_source_equals_growth_of_its_torch_dist_form(grown_pp):
    """Bit for bit, noise included (the noise depends on the layout of neither)."""
    legacy, before, log = grown_pp
    got = ckpt_tools.read_checkpoint(legacy / "grown-pp" / ITER)
    want = ckpt_tools.read_checkpoint(legacy / "grown-pp-dist" / ITER)
    assert got.keys() == want.keys() and len(got) > 10
    from megatron_recycle.io.checkpoint import CheckpointInfo

    objects = [sorted(CheckpointInfo.read(legacy / g).objects) for g in ("grown-pp", "grown-pp-dist")]
    assert objects[0] == objects[1] and objects[0]
    assert [k for k in want if not torch.equal(got[k], want[k])] == []
    assert ckpt_tools.tree_digest(legacy / "tp2-pp2-torch") == before  # never modified
    assert "--no-load-rng" in log and "optimizer state (legacy torch, per rank)" in log
    common = ckpt_tools.common_state(legacy / "grown-pp")
    assert common["args"].ckpt_format == "torch_dist" and common["args"].num_layers == 8
    assert "optimizer" not in common and (legacy / "grown-pp" / ITER / "metadata.json").is_file()
    assert "verify: OK" in cli("verify", "--source", legacy / "tp2-pp2-torch", "--grown", legacy / "grown-pp").stdout


def test_inspect_plan_and_norms_read_a_legacy_source(legacy, tmp_path):
    from megatron_recycle import compat
    from megatron_recycle.errors import GrowthError
    from megatron_recycle.io.checkpoint import CheckpointInfo

    summary = json.loads(cli("inspect", legacy / "tp2-pp2-torch", "--json").stdout)
    assert summary["path"].endswith(ITER)
    plan = json.loads(cli("plan", "--load", legacy / "tp2-ep2-torch", "--grow-depth", "2", "--grow-experts", "2",
                          "--ep", "2", "--json").stdout)
    assert plan["source"].endswith(ITER)
    norms = json.loads(cli("norms", legacy / "tp2-ep2-torch", "--out", tmp_path, "--json").stdout)
    assert len(norms["experts"]) == 4 * 4 and (tmp_path / "expert_norms.csv").is_file()
    with pytest.raises(GrowthError, match="grow it offline"):  # not at load time
        compat.check_loadable(CheckpointInfo.read(legacy / "tp2-ep2-torch"))
    from megatron_recycle import merge

    with pytest.raises(GrowthError, match="--grow-from-second .*a legacy torch checkpoint"):  # nothing pins it
        merge.read_second(CheckpointInfo.read(legacy / "tp2-ep2-dist"), legacy / "tp2-ep2-torch")


@pytest.mark.parametrize("name", ["tp2-ep2", "tp2-pp2"])
def test_grown_legacy_source_keeps_the_function_in_another_layout(ranks, legacy, name):
    """alpha = 0, zero-initialised depth copies, top-k x 2: the grown checkpoint, loaded plainly
    by megatron-core at TP1 EP2, gives the source's logits."""
    grown = legacy / f"grown-exact-{name}"
    cli("grow", "--load", legacy / f"{name}-torch", "--save", grown, *EXACT_FLAGS)
    assert "verify: OK" in cli("verify", "--source", legacy / f"{name}-torch", "--grown", grown).stdout
    ranks("legacy_torch.py", 2, "logits", legacy / f"{name}-dist" / ITER, grown / ITER, legacy)
    error = json.loads((legacy / "logits.json").read_text())
    assert error <= 1e-5, f"relative logit error {error:.3g}"


def test_a_pickled_object_outside_the_allow_list_is_refused(legacy, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(legacy / "tp2-ep2-torch", src)
    victim = src / ITER / "mp_rank_01_000" / "model_optim_rng.pt"
    state = torch_load(victim)
    state["payload"] = os.system  # unpickling it would resolve a function that runs commands
    torch.save(state, victim)
    for argv in (("inspect", src), ("grow", "--load", src, "--save", tmp_path / "out", *GROW_FLAGS)):
        proc = cli(*argv, check=False)
        assert proc.returncode == 3, proc.stderr
        assert "mp_rank_01_000/model_optim_rng.pt: refused" in proc.stderr and "system" in proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
