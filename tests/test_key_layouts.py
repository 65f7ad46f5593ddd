"""TE-spec, MLA, mixed-stack and singleton-expert key layouts, grown across shardings."""

import json

import pytest

LAYOUTS = [
    "decoder.layers.pre_mlp_layernorm.weight",  # TE spec pre-MLP norm
    "decoder.layers.self_attention.linear_qkv.layer_norm_weight",  # TE fused norm
    "decoder.layers.self_attention.linear_kv_down_proj.weight",  # MLA
    "decoder.layers.mlp.experts.experts.linear_fc1._extra_state",  # TE extra state objects
    "decoder.layers.mlp.router.expert_bias",
    "decoder.layers.5.mlp.experts.7.linear_fc1.weight_w",  # singleton experts, GLU split
    "decoder.layers.5.self_attention.linear_proj.weight",  # layers indexed in keys
    "optimizer.state.fp32_param.decoder.layers.mlp.experts",  # non-distributed optimizer
    "optimizer.state.exp_avg.decoder.layers.mlp.experts",
]

@pytest.fixture(scope="module")
def report(ranks, tmp_path_factory):
    out = tmp_path_factory.mktemp("keys")
    ranks("key_layouts.py", 2, out)
    return json.loads((out / "report.json").read_text())


def test_every_grown_shard_and_object_matches_the_plan(report):
    for rank_report in report:
        wrong = [name for name, ok in rank_report.items() if not ok]
        assert not wrong, f"mismatched after growth: {wrong[:5]}"


@pytest.mark.parametrize("fragment", LAYOUTS)
def test_layout_was_exercised(report, fragment):
    assert any(fragment in name for rank_report in report for name in rank_report)
