"""Megatron-FSDP's `fsdp_dtensor` checkpoints as growth sources: read as the torch_dist
checkpoint of the same weights, grown offline into torch_dist, verified, loaded.

The source is written by tests/workers/fsdp_dtensor_source.py: Megatron-FSDP cannot be built on
CPU, so a plain GPTModel's state dict goes through megatron-core's own fsdp_dtensor key
functions (`handle_experts_in_state_dict`, `handle_fp8_extra_state_case`), the SwiGLU `_w`/`_v`
split done as `handle_swiglu_in_state_dict` lays it out, DTensors, and torch DCP's `save`.
"""

import argparse
import json

import pytest
import torch

import ckpt_tools
from scenarios import FSDP_PLAN
from test_offline_tools import cli

GROW_FLAGS = ["--grow-depth", "2", "--grow-experts", "2", "--grow-noise-alpha", "0.01", "--grow-seed", "7"]


@pytest.fixture(scope="module")
def sources(ranks, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    ranks("fsdp_dtensor_source.py", 2, "source", out)
    return out


@pytest.fixture(scope="module")
def grown(sources):
    before = ckpt_tools.tree_digest(sources / "fsdp")
    log = cli("grow", "--load", sources / "fsdp", "--save", sources / "g-fsdp", *GROW_FLAGS).stderr
    cli("grow", "--load", sources / "td", "--save", sources / "g-td", *GROW_FLAGS)
    return sources, before, log


def test_the_source_is_megatron_fsdp_s_layout(sources):
    """What the reader is tested on: torch DCP files, `model.` names, experts by global id
    (EP rank 1 renamed its local 0, 1 to 2, 3), GLU halves, no `_extra_state`, objects."""
    from megatron_recycle.io.safe_pickle import load_metadata

    iteration = sources / "fsdp" / "iter_0000005"
    assert not (iteration / "metadata.json").exists() and not (iteration / "common.pt").exists()
    stored = load_metadata(iteration / ".metadata").state_dict_metadata
    assert "model.decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight_v" in stored
    assert "model.decoder.layers.0.mlp.shared_experts.linear_fc1.weight_w" in stored
    assert "optimizer.state.module.decoder.layers.0.self_attention.linear_qkv.weight.exp_avg" in stored
    assert {"args", "iteration", "opt_param_scheduler.max_lr"} <= stored.keys()
    assert not [k for k in stored if "_extra_state" in k]


def test_reads_as_the_torch_dist_checkpoint_of_the_same_weights(sources):
    """Every unit of every tensor, as a row box straddling the GLU halves where there are two."""
    import itertools

    from megatron_recycle import indexing
    from megatron_recycle.io.checkpoint import CheckpointInfo
    from megatron_recycle.io.reader import read_boxes, tensor_request

    fsdp, td = CheckpointInfo.read(sources / "fsdp"), CheckpointInfo.read(sources / "td")
    assert fsdp.shapes == td.model_shapes() and fsdp.dtypes == {k: td.dtypes[k] for k in fsdp.shapes}
    assert fsdp.architecture() == td.architecture() and fsdp.iteration == td.iteration == 5
    assert fsdp.optimizer_format == "fsdp_dtensor" and fsdp.objects == []
    assert fsdp.common["opt_param_scheduler"]["max_lr"] == pytest.approx(3e-4)
    expected = ckpt_tools.read_checkpoint(td.path)
    compared = 0
    for key, shape in fsdp.shapes.items():
        prepend = indexing.stored_prepend_axes(key)
        rows = shape[prepend]
        for index in itertools.product(*map(range, shape[:prepend])):
            box = torch.empty((rows // 2,) + shape[prepend + 1:])
            at = index + (rows // 4,) + (0,) * (len(shape) - prepend - 1)
            got = read_boxes(fsdp.path, {"x": tensor_request(key, box, shape, at, prepend)})["x"]
            assert torch.equal(got, expected[key][index][rows // 4:rows // 4 + rows // 2]), (key, index)
            compared += 1
    assert compared == 40


def test_grown_offline_like_the_torch_dist_source_by_the_plan(grown):
    sources, before, log = grown
    assert ckpt_tools.tree_digest(sources / "fsdp") == before
    assert "optimizer state (fsdp_dtensor) cannot be grown" in log
    a = ckpt_tools.read_checkpoint(sources / "g-fsdp" / "iter_0000005")
    b = ckpt_tools.read_checkpoint(sources / "g-td" / "iter_0000005")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    source = ckpt_tools.read_checkpoint(sources / "td" / "iter_0000005")
    originals = torch.tensor([copy == 0 for _, copy in FSDP_PLAN.expert_map()])
    for key, tensor in a.items():
        want = ckpt_tools.by_plan(FSDP_PLAN, key, source[key])
        if ckpt_tools.indexed_by_expert(key):  # copies carry noise: the originals are exact
            experts = 1 if ".experts.experts." in key else -2 if key.endswith("weight") else -1
            tensor, want = (t.index_select(experts, originals.nonzero().flatten()) for t in (tensor, want))
        assert torch.equal(tensor, want), key
    common = ckpt_tools.common_state(sources / "g-fsdp")
    assert common["args"].ckpt_format == "torch_dist" and common["args"].num_experts == 8


def test_verify_passes(grown):
    sources, _, _ = grown
    proc = cli("verify", "--source", sources / "fsdp", "--grown", sources / "g-fsdp", *GROW_FLAGS)
    assert "verify: OK" in proc.stdout + proc.stderr


def test_plain_megatron_core_loads_the_grown_checkpoint(ranks, grown):
    sources, _, _ = grown
    ranks("fsdp_dtensor_source.py", 2, "load", sources / "g-fsdp" / "iter_0000005", sources)
    for rank in json.loads((sources / "load.json").read_text()):
        assert rank["compared"] > 20 and rank["missing"] == rank["unexpected"] == []


def test_growth_at_load_time_is_refused_naming_the_offline_grow(sources):
    """What the Megatron-LM and Megatron-Bridge adapters check before building anything."""
    from megatron_recycle import compat
    from megatron_recycle.errors import GrowthError
    from megatron_recycle.io.checkpoint import CheckpointInfo

    with pytest.raises(GrowthError, match="--load .*fsdp_dtensor.*megatron-recycle grow --load"):
        compat.check_loadable(CheckpointInfo.read(sources / "fsdp" / "iter_0000005"))


def test_another_torch_dcp_format_is_refused(tmp_path):
    from torch.distributed.checkpoint import save

    from megatron_recycle.errors import GrowthError
    from megatron_recycle.io.checkpoint import CheckpointInfo

    save({"args": argparse.Namespace(ckpt_format="torch_dcp"), "model": {"w": torch.zeros(2)}},
         checkpoint_id=str(tmp_path / "iter_0000001"), no_dist=True)
    with pytest.raises(GrowthError, match="args say --ckpt-format 'torch_dcp'.*re-save with --ckpt-format torch_dist"):
        CheckpointInfo.read(tmp_path / "iter_0000001", flag="CKPT")


def test_names_of_transformer_engine_grouped_experts_and_indexed_layers():
    """The translation alone, for names this CPU test cannot save: TE's grouped GEMM experts
    (`weight{e}`, SwiGLU-split), layers kept in the key (list `moe_layer_freq`)."""
    from megatron_recycle.indexing import FsdpName, from_fsdp_dtensor

    grouped = "model.decoder.layers.3.mlp.experts.linear_fc1.weight17_v"
    assert from_fsdp_dtensor(grouped, True, {}) == FsdpName(
        "decoder.layers.mlp.experts.experts.linear_fc1.weight", (3, 17), "v")
    assert from_fsdp_dtensor("model.decoder.layers.3.mlp.experts.linear_fc2.weight5", False, {}) == FsdpName(
        "decoder.layers.3.mlp.experts.experts.linear_fc2.weight", (5,), None)
    assert from_fsdp_dtensor("model.decoder.layers.2.mlp.router.weight", False, {}) == FsdpName(
        "decoder.layers.2.mlp.router.weight", (), None)
    assert from_fsdp_dtensor("optimizer.state.module.decoder.layers.0.mlp.router.weight.exp_avg", True, {}) is None
