"""The pure layers, rank-free and table-driven: where keys keep layers and experts
(`indexing.parse_key`), the index algebra between source and target, and one target shard's
mapping (`mapping.map_shard`, `map_object`)."""

import pytest

from megatron_recycle import indexing
from megatron_recycle.errors import GrowthError
from megatron_recycle.mapping import Box, map_object, map_shard
from megatron_recycle.plan import Architecture, DepthGrowth, GrowthPlan, Upcycling, WidthGrowth

PLAN = GrowthPlan(Architecture(num_layers=2, num_experts=2, topk=1), DepthGrowth(2),
                  WidthGrowth(2, noise_alpha=0.01))  # layers 0 0 1 1; experts 0 1 0' 1'


@pytest.mark.parametrize("key, prepend, want", [
    # key, prepend_axis_num → (prefix, decoder, layer_axis, layer_in_key, expert_axis, expert_in_key, rows)
    ("decoder.layers.self_attention.linear_qkv.weight", 1, ("", True, 0, None, None, None, False)),
    ("decoder.layers.mlp.experts.experts.linear_fc1.weight", 2, ("", True, 0, None, 1, None, False)),
    ("decoder.layers.mlp.router.weight", 1, ("", True, 0, None, None, None, True)),
    ("decoder.layers.mlp.router.expert_bias", 1, ("", True, 0, None, None, None, True)),
    ("decoder.layers.3.mlp.experts.5.linear_fc1.weight_w", 0, ("", True, None, 3, None, 5, False)),
    ("decoder.layers.3.mlp.experts.experts.linear_fc2.weight", 1, ("", True, None, 3, 0, None, False)),
    ("decoder.layers.mlp.shared_experts.linear_fc1.weight", 1, ("", True, 0, None, None, None, False)),
    ("mtp.layers.0.transformer_layer.mlp.experts.experts.linear_fc1.weight", 1,
     ("", False, None, None, 0, None, False)),
    ("optimizer.state.exp_avg.decoder.layers.mlp.experts.experts.linear_fc2.weight", 2,
     ("optimizer.state.exp_avg.", True, 0, None, 1, None, False)),
    ("embedding.word_embeddings.weight", 0, ("", False, None, None, None, None, False)),
])
def test_parse_key(key, prepend, want):
    k = indexing.parse_key(key, prepend)
    assert (k.prefix, k.decoder, k.layer_axis, k.layer_in_key, k.expert_axis, k.expert_in_key,
            k.expert_rows) == want


@pytest.mark.parametrize("key, prepend", [
    ("decoder.layers.mlp.experts.experts.linear_fc1.weight", 2),
    ("decoder.layers.self_attention.linear_proj.weight", 1),
    ("decoder.layers.3.mlp.experts.experts.linear_fc1.weight", 1),
    ("decoder.layers.3.mlp.experts.5.linear_fc1.weight", 0),
    ("embedding.word_embeddings.weight", 0),
])
def test_stored_prepend_axes_from_the_key_alone(key, prepend):
    assert indexing.stored_prepend_axes(key) == prepend


@pytest.mark.parametrize("key, index, want", [
    # target key and prepended index → (source key, source index, layer, layer copy, expert, expert copy)
    ("decoder.layers.mlp.experts.experts.linear_fc1.weight", (3, 2),
     ("decoder.layers.mlp.experts.experts.linear_fc1.weight", (1, 0), 3, 1, 2, 1)),
    ("decoder.layers.mlp.experts.experts.linear_fc1.weight", (0, 1),
     ("decoder.layers.mlp.experts.experts.linear_fc1.weight", (0, 1), 0, 0, 1, 0)),
    ("decoder.layers.self_attention.linear_proj.weight", (2,),
     ("decoder.layers.self_attention.linear_proj.weight", (1,), 2, 0, None, 0)),
    ("decoder.layers.3.mlp.experts.2.linear_fc2.weight", (),
     ("decoder.layers.1.mlp.experts.0.linear_fc2.weight", (), 3, 1, 2, 1)),
    ("optimizer.state.exp_avg.decoder.layers.1.mlp.experts.experts.linear_fc2.weight", (3,),
     ("optimizer.state.exp_avg.decoder.layers.0.mlp.experts.experts.linear_fc2.weight", (1,), 1, 1, 3, 1)),
    ("output_layer.weight", (), ("output_layer.weight", (), -1, 0, None, 0)),
])
def test_origin_of_a_target_slab(key, index, want):
    o = indexing.origin(PLAN, indexing.parse_key(key, len(index)), index)
    assert (o.key, o.index, o.layer, o.layer_copy, o.expert, o.expert_copy) == want


def test_source_to_target_is_the_inverse_of_origin():
    """Every target slab made from a source slab names that source slab as its origin."""
    keys = {"decoder.layers.mlp.experts.experts.linear_fc1.weight": (2, 2),
            "decoder.layers.1.mlp.experts.0.linear_fc1.weight": (),
            "decoder.layers.mlp.router.weight": (2,)}
    for key, source_shape in keys.items():
        layout = indexing.parse_key(key, len(source_shape))
        for source_index in [tuple(i) for i in __import__("itertools").product(*map(range, source_shape))]:
            targets = [(t, i) for t in indexing.target_keys(PLAN, layout)
                       for i in indexing.target_indices(PLAN, layout, source_index)]
            assert len(targets) == (2 if layout.has_layer else 1) * (2 if layout.has_expert_index else 1)
            for target_key, index in targets:
                o = indexing.origin(PLAN, indexing.parse_key(target_key, len(index)), index)
                assert (o.key, o.index) == (key, source_index)


@pytest.mark.parametrize("key, source, target", [
    ("decoder.layers.mlp.experts.experts.linear_fc1.weight", (2, 2, 8, 4), (4, 4, 8, 4)),
    ("decoder.layers.mlp.router.weight", (2, 2, 4), (4, 4, 4)),
    ("decoder.layers.self_attention.linear_qkv.weight", (2, 12, 4), (4, 12, 4)),
    ("decoder.layers.1.mlp.router.weight", (2, 4), (4, 4)),
    ("output_layer.weight", (64, 4), (64, 4)),
])
def test_resized_grows_and_shrinks_the_layer_expert_and_row_axes(key, source, target):
    prepend = indexing.stored_prepend_axes(key)
    layout = indexing.parse_key(key, prepend)
    assert indexing.resized(PLAN, layout, source, row_axis=prepend) == target
    assert indexing.resized(PLAN, layout, target, row_axis=prepend, to_target=False) == source


SOURCE_SHAPES = {
    "decoder.layers.mlp.experts.experts.linear_fc1.weight": (2, 2, 8, 4),
    "decoder.layers.mlp.router.weight": (2, 2, 4),
    "decoder.layers.self_attention.linear_proj.weight": (2, 4, 4),
    "optimizer.state.exp_avg.decoder.layers.mlp.experts.experts.linear_fc1.weight": (2, 2, 8, 4),
    "optimizer.state.param.decoder.layers.mlp.experts.experts.linear_fc1.weight": (2, 2, 8, 4),
}
EXPERT = "decoder.layers.mlp.experts.experts.linear_fc1.weight"


def test_an_expert_copy_reads_its_source_expert_and_gets_noise_keyed_by_the_target():
    fill = map_shard(PLAN, SOURCE_SHAPES, EXPERT, (4, 4, 8, 4), (3, 3, 4, 0), (4, 4), 2)
    assert fill.source == Box(EXPERT, (2, 2, 8, 4), (1, 1), (4, 0), (4, 4))  # row half 4:8 of 1/1
    assert fill.rows is None and not fill.zero
    noise = fill.noise
    assert (noise.layer, noise.experts, noise.unit_shape, noise.offset) == (3, ((3, -1),), (8, 4), (4, 0))
    assert noise.sigma_unit == Box.whole_unit(EXPERT, (2, 2, 8, 4), (1, 1))


def test_an_original_expert_is_a_plain_copy():
    fill = map_shard(PLAN, SOURCE_SHAPES, EXPERT, (4, 4, 8, 4), (2, 1, 0, 0), (8, 4), 2)
    assert fill.source == Box(EXPERT, (2, 2, 8, 4), (1, 1), (0, 0), (8, 4)) and fill.noise is None


def test_router_rows_map_to_source_rows_and_only_copies_get_noise():
    key = "decoder.layers.mlp.router.weight"
    fill = map_shard(PLAN, SOURCE_SHAPES, key, (4, 4, 4), (1, 1, 0), (3, 4), 1)  # target rows 1..3
    assert fill.rows == (1, 0, 1) and fill.source == Box(key, (2, 2, 4), (0,), (0, 0), (2, 4))
    assert fill.noise.experts == ((2, 1), (3, 2))  # (target expert, local row) of the copies


def test_master_params_take_the_weights_sigma_and_noise_stream():
    key = "optimizer.state.param." + EXPERT
    fill = map_shard(PLAN, SOURCE_SHAPES, key, (4, 4, 8, 4), (0, 2, 0, 0), (8, 4), 2)
    assert fill.noise.name == EXPERT and fill.noise.sigma_unit.key == EXPERT


@pytest.mark.parametrize("policy, zero", [("copy", False), ("zero", True)])
def test_moments_of_copies_are_copied_or_zeroed_and_never_noisy(policy, zero):
    key = "optimizer.state.exp_avg." + EXPERT
    fill = map_shard(PLAN, SOURCE_SHAPES, key, (4, 4, 8, 4), (1, 3, 0, 0), (8, 4), 2, policy)
    assert fill.zero is zero and fill.noise is None


def test_zero_init_copies_zero_only_the_output_projections_of_layer_copies():
    plan = GrowthPlan(PLAN.source, DepthGrowth(2, zero_copy_outputs=True), WidthGrowth(2))
    key = "decoder.layers.self_attention.linear_proj.weight"
    assert map_shard(plan, SOURCE_SHAPES, key, (4, 4, 4), (1, 0, 0), (4, 4), 1).zero  # layer 1: a copy
    assert not map_shard(plan, SOURCE_SHAPES, key, (4, 4, 4), (2, 0, 0), (4, 4), 1).zero
    assert not map_shard(plan, SOURCE_SHAPES, EXPERT, (4, 4, 8, 4), (1, 0, 0, 0), (8, 4), 2).zero


@pytest.mark.parametrize("key, shape, offset, local, prepend, message", [
    (EXPERT, (6, 4, 8, 4), (0, 0, 0, 0), (8, 4), 2, "has 6 layers but the growth plan makes 4; set --num-layers 4"),
    (EXPERT, (4, 2, 8, 4), (0, 0, 0, 0), (8, 4), 2, "has 2 experts but the growth plan makes 4; set --num-experts 4"),
    (EXPERT, (4, 4, 16, 4), (0, 0, 0, 0), (16, 4), 2, "but the source checkpoint has (2, 2, 8, 4)"),
    ("decoder.layers.mlp.shared_experts.linear_fc1.weight", (4, 8, 4), (0, 0, 0), (8, 4), 1,
     "is not in the source checkpoint"),
])
def test_a_target_the_plan_does_not_make_is_refused_naming_the_flag(key, shape, offset, local, prepend, message):
    with pytest.raises(GrowthError, match=__import__("re").escape(message)):
        map_shard(PLAN, SOURCE_SHAPES, key, shape, offset, local, prepend)


def test_objects_map_their_prepended_axes_only():
    key = "decoder.layers.mlp.experts.experts.linear_fc1._extra_state"
    stored = {f"{key}/shard_1.0_2.2", "decoder.layers.1.mlp.experts.1.linear_fc1._extra_state/shard_0_1"}
    assert map_object(PLAN, stored, key, (4, 4), (3, 2)) == (key, (2, 2), (1, 0))
    indexed = "decoder.layers.2.mlp.experts.3.linear_fc1._extra_state"
    assert map_object(PLAN, stored, indexed, (1,), (0,)) == (
        "decoder.layers.1.mlp.experts.1.linear_fc1._extra_state", (1,), (0,))


def test_an_indexed_target_object_maps_to_a_stacked_source_one():
    """A mixed dense/MoE target (layers in keys) upcycled from a homogeneous source."""
    stored = {"decoder.layers.self_attention.linear_qkv._extra_state/shard_1_2"}
    key = "decoder.layers.3.self_attention.linear_qkv._extra_state"
    assert map_object(PLAN, stored, key, (1,), (0,)) == (
        "decoder.layers.self_attention.linear_qkv._extra_state", (2,), (1,))


def test_an_indexed_target_tensor_maps_to_a_stacked_source_one():
    shapes = {"decoder.layers.self_attention.linear_proj.weight": (2, 4, 4)}
    fill = map_shard(PLAN, shapes, "decoder.layers.3.self_attention.linear_proj.weight", (4, 4), (0, 2), (4, 2), 0)
    assert fill.source == Box("decoder.layers.self_attention.linear_proj.weight", (2, 4, 4), (1,), (0, 2), (4, 2))


UPCYCLE = GrowthPlan(Architecture(num_layers=2), DepthGrowth(2, zero_copy_outputs=True),
                     WidthGrowth(noise_alpha=0.01), Upcycling(experts=4, topk=2, granularity=2, shared_expert=True))
DENSE = {"decoder.layers.mlp.linear_fc1.weight": (2, 16, 4), "decoder.layers.mlp.linear_fc2.weight": (2, 4, 8),
         "decoder.layers.mlp.linear_fc1.layer_norm_weight": (2, 4)}


@pytest.mark.parametrize("key, shape, offset, local, prepend, want", [
    # expert 3 = slice 1, copy 1, of a GLU fc1 (8 rows: gate 0-3, up 4-7 per slice): the up half
    ("decoder.layers.mlp.experts.experts.linear_fc1.weight", (4, 4, 8, 4), (2, 3, 4, 0), (4, 4), 2,
     dict(source=Box("decoder.layers.mlp.linear_fc1.weight", (2, 16, 4), (1,), (12, 0), (4, 4)), scale=1.0, noisy=True)),
    # its fc2: columns 4-7 of the dense fc2, scaled by G x 1/2 (a shared expert takes the other half)
    ("decoder.layers.mlp.experts.experts.linear_fc2.weight", (4, 4, 4, 4), (0, 1, 0, 0), (4, 4), 2,
     dict(source=Box("decoder.layers.mlp.linear_fc2.weight", (2, 4, 8), (0,), (0, 4), (4, 4)), scale=1.0, noisy=False)),
    ("decoder.layers.mlp.shared_experts.linear_fc2.weight", (4, 4, 8), (0, 0, 0), (4, 8), 1,
     dict(source=Box("decoder.layers.mlp.linear_fc2.weight", (2, 4, 8), (0,), (0, 0), (4, 8)), scale=0.5, noisy=False)),
    ("decoder.layers.pre_mlp_layernorm.weight", (4, 4), (2, 0), (4,), 1,
     dict(source=Box("decoder.layers.mlp.linear_fc1.layer_norm_weight", (2, 4), (1,), (0,), (4,)), scale=1.0, noisy=False)),
])
def test_upcycled_tensors_come_from_the_dense_layer(key, shape, offset, local, prepend, want):
    fill = map_shard(UPCYCLE, DENSE, key, shape, offset, local, prepend)
    assert fill.source == want["source"] and (fill.noise is not None) == want["noisy"]
    if "fc2" not in key or "shared" in key:
        assert fill.scale == want["scale"]
    else:
        assert fill.scale == 2 * 0.5  # granularity 2, halved beside the shared expert


def test_an_upcycled_router_is_zero_and_reads_nothing():
    fill = map_shard(UPCYCLE, DENSE, "decoder.layers.mlp.router.weight", (4, 4, 4), (0, 0, 0), (4, 4), 1)
    assert fill.zero and fill.source is None
    copy_output = map_shard(UPCYCLE, DENSE, "decoder.layers.mlp.experts.experts.linear_fc2.weight",
                            (4, 4, 4, 4), (1, 0, 0, 0), (4, 4), 2)
    assert copy_output.zero  # layer 1 is a depth copy: zero-init output projection
