"""Megatron-FSDP's `fsdp_dtensor` checkpoints as growth sources: read as the torch_dist
checkpoint of the same weights, grown offline into torch_dist and into fsdp_dtensor (optimizer
moments and param groups carried), verified, loaded.

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
from scenarios import FSDP_EXACT_PLAN, FSDP_PLAN
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
    log = cli("grow", "--load", sources / "fsdp", "--save", sources / "g-fsdp", *GROW_FLAGS,
              "--ckpt-format", "torch_dist").stderr
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
    assert fsdp.model_shapes() == td.model_shapes() and {k: fsdp.dtypes[k] for k in fsdp.model_shapes()} == {k: td.dtypes[k] for k in td.model_shapes()}
    assert {k for k in fsdp.shapes if k.startswith("optimizer.")} == {   # the per-parameter moments
        f"optimizer.state.{m}.{k}" for k in td.model_shapes() for m in ("exp_avg", "exp_avg_sq")}
    assert fsdp.architecture() == td.architecture() and fsdp.iteration == td.iteration == 5
    assert fsdp.optimizer_format == "fsdp_dtensor" and fsdp.objects == []
    assert fsdp.common["opt_param_scheduler"]["max_lr"] == pytest.approx(3e-4)
    expected = ckpt_tools.read_checkpoint(td.path)
    compared = 0
    for key, shape in fsdp.model_shapes().items():
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
    assert "optimizer state (fsdp_dtensor) cannot be grown into torch_dist" in log
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


@pytest.fixture(scope="module")
def grown_fsdp(sources):
    """Grown into fsdp_dtensor (the default for an fsdp_dtensor source), in this process: by
    FSDP_EXACT_PLAN (moments copied) and by FSDP_PLAN with the copies' moments zeroed."""
    from megatron_recycle import offline
    from megatron_recycle.options import Growth

    before = ckpt_tools.tree_digest(sources / "fsdp")
    for name, plan, optimizer in (("f-exact", FSDP_EXACT_PLAN, "copy"), ("f-noisy", FSDP_PLAN, "zero")):
        offline.grow(sources / "fsdp", sources / name, Growth(plan.depth, plan.width, optimizer=optimizer),
                     log=lambda s: None)
    assert ckpt_tools.tree_digest(sources / "fsdp") == before
    return sources


def _as_torch_dist(path) -> dict:
    """Every tensor of a checkpoint under its torch_dist key, read unit by unit in one read."""
    import itertools

    from megatron_recycle import indexing
    from megatron_recycle.io.checkpoint import CheckpointInfo
    from megatron_recycle.io.reader import read_boxes, tensor_request

    info = CheckpointInfo.read(path)
    out, requests = {}, {}
    for key, shape in info.shapes.items():
        out[key] = torch.empty(shape, dtype=info.dtypes[key])
        prepend = indexing.stored_prepend_axes(key)
        for index in itertools.product(*map(range, shape[:prepend])):
            requests[(key, index)] = tensor_request(key, out[key][index], shape,
                                                    index + (0,) * (len(shape) - prepend), prepend)
    read_boxes(info.path, requests)
    return out


def test_grown_into_fsdp_dtensor_in_its_layout_by_the_plan(grown_fsdp):
    """Megatron-FSDP's names at the grown size (expert 7 of layer 3, its GLU half, its moment and
    param group), the common objects, and every weight and moment the source's slice by the
    plan: copies' moments zero (--grow-optimizer zero), the originals' exact."""
    from megatron_recycle.io.safe_pickle import load_metadata

    iteration = grown_fsdp / "f-noisy" / "iter_0000005"
    assert not (iteration / "metadata.json").exists() and not (iteration / "common.pt").exists()
    stored = load_metadata(iteration / ".metadata").state_dict_metadata
    name = "decoder.layers.3.mlp.experts.local_experts.7.linear_fc1.weight_v"
    assert {f"model.{name}", f"optimizer.state.module.{name}.exp_avg_sq",
            f"optimizer.param_to_group_meta.module.{name}.wd_mult", "args", "iteration",
            "opt_param_scheduler.max_lr", "megatron_recycle"} <= stored.keys()
    assert tuple(stored[f"model.{name}"].size) == (16, 32)
    common = ckpt_tools.common_state(grown_fsdp / "f-noisy")
    assert common["args"].ckpt_format == "fsdp_dtensor" and common["args"].num_experts == 8
    assert common["args"].num_layers == 4 and common["iteration"] == 5
    grown, source = _as_torch_dist(iteration), _as_torch_dist(grown_fsdp / "fsdp" / "iter_0000005")
    assert grown.keys() == source.keys() and len(grown) == 48
    originals = torch.tensor([copy == 0 for _, copy in FSDP_PLAN.expert_map()])
    first_layers = torch.tensor([FSDP_PLAN.layer_source(t)[1] == 0 for t in range(FSDP_PLAN.target_num_layers)])
    for key, tensor in grown.items():
        want = ckpt_tools.by_plan(FSDP_PLAN, key, source[key])
        moment = key.startswith("optimizer.")
        if moment and ckpt_tools.model_key(key).startswith("decoder.layers."):  # layer copies: zero
            assert not tensor[~first_layers].any(), key
            tensor, want = tensor[first_layers], want[first_layers]
        if ckpt_tools.indexed_by_expert(key):  # expert copies: noise, or zero moments
            experts = 1 if ".experts.experts." in key else -2 if key.endswith("weight") else -1
            assert not moment or not tensor.index_select(experts, (~originals).nonzero().flatten()).any(), key
            tensor, want = (t.index_select(experts, originals.nonzero().flatten()) for t in (tensor, want))
        assert torch.equal(tensor, want), key


def test_verify_passes_on_fsdp_dtensor_output(grown_fsdp):
    from megatron_recycle.verify import verify

    for name in ("f-exact", "f-noisy"):
        report = verify(grown_fsdp / "fsdp", grown_fsdp / name)
        assert report.ok and report.tensors == 48, (name, report.mismatches[:5])
    assert report.noisy > 0


def test_megatron_fsdp_s_key_handling_loads_it_at_the_grown_size_logits_kept(ranks, grown_fsdp):
    """Loaded as Megatron-LM loads fsdp_dtensor (every key of the grown model's state dict
    required), alpha = 0 with zero-init copies: the logits are the source's."""
    ranks("fsdp_dtensor_source.py", 2, "logits", grown_fsdp / "fsdp" / "iter_0000005",
          grown_fsdp / "f-exact" / "iter_0000005", grown_fsdp)
    assert json.loads((grown_fsdp / "logits.json").read_text()) < 1e-5


def test_fsdp_dtensor_output_from_another_format_is_refused_before_writing(sources, tmp_path):
    from megatron_recycle import offline
    from megatron_recycle.errors import GrowthError
    from megatron_recycle.options import Growth

    with pytest.raises(GrowthError, match="--ckpt-format fsdp_dtensor: the source is a torch_dist checkpoint"):
        offline.grow(sources / "td", tmp_path / "out", Growth(FSDP_PLAN.depth), ckpt_format="fsdp_dtensor",
                     log=lambda s: None)
    assert not (tmp_path / "out").exists()


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


def test_fsdp_dtensor_names_are_written_as_they_are_read(sources):
    """`FsdpNaming.name` inverts `place` on every stored tensor of the source (local-spec norm
    renames, experts, GLU halves, moments) and on TE grouped-expert names."""
    from megatron_recycle.indexing import FsdpNaming
    from megatron_recycle.io.fsdp_dtensor import open_checkpoint
    from megatron_recycle.io.safe_pickle import load_metadata

    naming = open_checkpoint(sources / "fsdp" / "iter_0000005").naming
    names = [n for n in load_metadata(sources / "fsdp" / "iter_0000005" / ".metadata").state_dict_metadata
             if naming.place(n) is not None]
    assert len(names) == 3 * sum(n.startswith("model.") for n in names) == 150  # weights, 2 moments
    assert all(naming.name(*vars(naming.place(n)).values()) == n for n in names)
    grouped = FsdpNaming(True, (), grouped_experts=True, swiglu=True)
    for name in ("model.decoder.layers.3.mlp.experts.linear_fc1.weight17_v",
                 "optimizer.state.module.decoder.layers.3.mlp.experts.linear_fc2.weight5.exp_avg"):
        assert grouped.name(*vars(grouped.place(name)).values()) == name
