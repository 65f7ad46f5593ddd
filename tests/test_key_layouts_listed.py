"""An all-MoE GPT saved with `moe_layer_freq` as a list ([1, 1, 1, 1]): megatron-core keys its
layers by index (`decoder.layers.N.…`), not stacked. Grown offline and at load time into other
layouts, the two paths give the same tensors bit for bit, and the grown checkpoint keeps the
listed form (8 layers, `moe_layer_freq` [1] * 8) that Megatron builds from its args."""

import json

import pytest
import torch

import ckpt_tools
from test_offline_tools import GROW_FLAGS, cli

FC1 = "decoder.layers.{}.mlp.experts.experts.linear_fc1.weight"
FC2_MOMENT = "optimizer.state.exp_avg.decoder.layers.{}.mlp.experts.experts.linear_fc2.weight"


@pytest.fixture(scope="module")
def listed(ranks, tmp_path_factory):
    out = tmp_path_factory.mktemp("listed")
    ranks("offline_roundtrip.py", 2, "source-listed", out)
    before = ckpt_tools.tree_digest(out / "src-listed")
    cli("grow", "--load", out / "src-listed", "--save", out / "grown", *GROW_FLAGS)
    return out, before


def test_the_source_is_keyed_by_layer_as_megatron_core_writes_it(listed):
    out, before = listed
    source = ckpt_tools.read_checkpoint(out / "src-listed" / "iter_0000003")
    assert FC1.format(3) in source and FC1.replace("{}.", "") not in source
    assert FC2_MOMENT.format(3) in source
    assert ckpt_tools.tree_digest(out / "src-listed") == before  # never modified


def test_offline_growth_keeps_the_listed_form_and_follows_the_plan(listed):
    out, _ = listed
    args = ckpt_tools.common_state(out / "grown")["args"]
    assert (args.num_layers, args.num_experts, args.moe_layer_freq) == (8, 8, [1] * 8)
    grown = ckpt_tools.read_checkpoint(out / "grown" / "iter_0000003")
    source = ckpt_tools.read_checkpoint(out / "src-listed" / "iter_0000003")
    assert not any(k.startswith(("decoder.layers.mlp.", "optimizer.state.exp_avg.decoder.layers.mlp."))
                   for k in grown)
    assert torch.equal(grown[FC2_MOMENT.format(5)][6], source[FC2_MOMENT.format(2)][2])  # copies: moments kept
    for target_layer in range(8):  # interposition: layer l comes from l // 2
        got, src = grown[FC1.format(target_layer)], source[FC1.format(target_layer // 2)]
        assert torch.equal(got[:4], src)  # the original experts, exact
        assert 0 < (got[4:] - src).abs().max() < 0.1 * src.abs().max()  # copies: small noise
    assert "verify: OK" in cli("verify", "--source", out / "src-listed", "--grown", out / "grown").stdout


def test_load_time_growth_into_other_layouts_equals_the_offline_growth(ranks, listed):
    out, _ = listed
    ranks("offline_roundtrip.py", 2, "compare", out / "src-listed" / "iter_0000003",
          out / "grown" / "iter_0000003", out, "listed")
    counts = json.loads((out / "compare.json").read_text())
    assert set(counts) == {"ep2", "tp2", "pp2"} and min(counts.values()) > 50, counts
