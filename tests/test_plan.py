"""The growth plan and the reads it asks for: metadata alone, no ranks."""

import pytest

from megatron_recycle.plan import (
    Architecture,
    CopyInit,
    DepthGrowth,
    GrowthError,
    GrowthPlan,
    WidthGrowth,
)

MOE = Architecture(num_layers=4, num_experts=4, topk=2)


def test_interposition_copies_each_layer_in_place():
    plan = GrowthPlan(MOE, DepthGrowth(3))
    assert plan.layer_map == (0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3)
    assert plan.layer_copy == (0, 1, 2) * 4


def test_stack_repeats_the_whole_stack():
    plan = GrowthPlan(MOE, DepthGrowth(2, method="stack"))
    assert plan.layer_map == (0, 1, 2, 3, 0, 1, 2, 3)
    assert plan.layer_copy == (0, 0, 0, 0, 1, 1, 1, 1)


def test_skip_first_and_last_keep_those_layers_once():
    plan = GrowthPlan(MOE, DepthGrowth(2, skip_first=1, skip_last=1))
    assert plan.layer_map == (0, 1, 1, 2, 2, 3)
    stacked = GrowthPlan(MOE, DepthGrowth(2, method="stack", skip_first=1, skip_last=1))
    assert stacked.layer_map == (0, 1, 2, 1, 2, 3)


def test_explicit_layer_map_allows_non_integer_growth():
    src = Architecture(num_layers=24, num_experts=8, topk=2)
    layer_map = tuple(s for s in range(24) for _ in range(2 if s % 2 == 0 else 1))
    plan = GrowthPlan(src, DepthGrowth(layer_map=layer_map))
    assert plan.target_num_layers == 36
    assert plan.layer_source(1) == (0, 1) and plan.layer_source(2) == (1, 0)


@pytest.mark.parametrize("layer_map, message", [
    ((0, 1, 2, 4), "names source layer"),
    ((0, 1, 1, 2), "leaves source layer"),
])
def test_bad_layer_map_names_the_flag(layer_map, message):
    with pytest.raises(GrowthError, match=f"--grow-layer-map {message}"):
        GrowthPlan(MOE, DepthGrowth(layer_map=layer_map))


def test_append_places_copies_after_all_originals():
    plan = GrowthPlan(MOE, width=WidthGrowth(3))
    assert plan.target_num_experts == 12
    assert plan.expert_map()[:8] == [(0, 0), (1, 0), (2, 0), (3, 0), (0, 1), (1, 1), (2, 1), (3, 1)]


def test_interleave_places_copies_next_to_their_source():
    plan = GrowthPlan(MOE, width=WidthGrowth(2, placement="interleave"))
    assert plan.expert_map() == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1)]


def test_topk_scales_or_is_kept():
    assert GrowthPlan(MOE, width=WidthGrowth(2)).target_topk == 4
    assert GrowthPlan(MOE, width=WidthGrowth(2, topk="keep")).target_topk == 2


def test_group_limited_routing_refuses_copies_leaving_their_group():
    grouped = Architecture(num_layers=2, num_experts=8, topk=4, router_num_groups=4, router_group_topk=2)
    with pytest.raises(GrowthError, match="--grow-expert-placement interleave"):
        GrowthPlan(grouped, width=WidthGrowth(2))
    plan = GrowthPlan(grouped, width=WidthGrowth(2, placement="interleave"))
    size = 16 // 4
    assert all(plan.expert_source(e)[0] // 2 == e // size for e in range(16))


def test_mixed_dense_moe_pattern_follows_the_layer_map():
    mixed = Architecture(num_layers=4, num_experts=4, topk=2, moe_layers=(True, False, True, False))
    assert GrowthPlan(mixed, DepthGrowth(2)).target.moe_layer_freq() == [1, 1, 0, 0, 1, 1, 0, 0]


@pytest.mark.parametrize("kwargs, flag", [
    (dict(num_layers=6), "--num-layers 6 does not match"),
    (dict(num_experts=12), "--num-experts 12 does not match"),
    (dict(topk=3), "--moe-router-topk 3 does not match"),
    (dict(expert_parallel=3), "--expert-model-parallel-size 3 does not divide"),
    (dict(pipeline_parallel=3), "--pipeline-model-parallel-size 3"),
])
def test_target_mismatch_names_the_flag(kwargs, flag):
    plan = GrowthPlan(MOE, DepthGrowth(2), WidthGrowth(2))
    with pytest.raises(GrowthError, match=flag):
        plan.check_target(**kwargs)


def test_topk_above_the_grown_expert_count_is_refused():
    unknown_topk = Architecture(num_layers=2, num_experts=2)  # no args in common.pt
    plan = GrowthPlan(unknown_topk, width=WidthGrowth(2))
    with pytest.raises(GrowthError, match="exceeds the 4 experts"):
        plan.check_target(topk=5)


def test_matching_target_passes():
    plan = GrowthPlan(MOE, DepthGrowth(2), WidthGrowth(2))
    plan.check_target(num_layers=8, num_experts=8, topk=4, expert_parallel=8, pipeline_parallel=4)


@pytest.mark.parametrize("width, flag", [
    (WidthGrowth(0), "--grow-experts"),
    (WidthGrowth(2, placement="random"), "--grow-expert-placement"),
    (WidthGrowth(2, topk="double"), "--grow-topk"),
    (WidthGrowth(2, noise_alpha=-1.0), "--grow-noise-alpha"),
    (WidthGrowth(2, noise_alpha=float("inf")), "--grow-noise-alpha must be between 0 and 1"),
    (WidthGrowth(2, noise_alpha=float("nan")), "--grow-noise-alpha"),
    (WidthGrowth(2, noise_alpha=1e300), "--grow-noise-alpha"),
])
def test_bad_width_options_name_the_flag(width, flag):
    with pytest.raises(GrowthError, match=flag):
        GrowthPlan(MOE, width=width)


def test_width_growth_of_a_dense_model_is_refused():
    with pytest.raises(GrowthError, match="needs a Mixture-of-Experts source"):
        GrowthPlan(Architecture(num_layers=4), width=WidthGrowth(2))


@pytest.mark.parametrize("init, width, message", [
    (CopyInit(weight_multiplier=0.0), WidthGrowth(2), "--grow-weight-multiplier must be a finite number > 0"),
    (CopyInit(weight_multiplier=-1.0), WidthGrowth(2), "--grow-weight-multiplier"),
    (CopyInit(weight_multiplier=float("nan")), WidthGrowth(2), "--grow-weight-multiplier"),
    (CopyInit(random_router=True), WidthGrowth(1), "--grow-random-router is a baseline of expert growth"),
    (CopyInit(reinit_expert_copies=True), WidthGrowth(1), "--grow-reinit-expert-copies is a baseline"),
    (CopyInit(random_router=True, init_std=0.0), WidthGrowth(2), "--grow-init-std must be"),
    (CopyInit(init_std=0.1), WidthGrowth(2), "--grow-init-std is the std of --grow-random-router"),
    (CopyInit(from_second=True), WidthGrowth(1), "--grow-from-second gives the expert copies"),
    (CopyInit(from_second=True, reinit_expert_copies=True), WidthGrowth(2),
     "--grow-from-second reads the expert copies .* draw them"),
])
def test_bad_copy_init_options_name_the_flag(init, width, message):
    with pytest.raises(GrowthError, match=message):
        GrowthPlan(MOE, DepthGrowth(2), width, init=init)


def test_copy_init_options_refused_where_they_mean_nothing():
    from megatron_recycle.plan import Upcycling

    dense = Architecture(num_layers=4)
    with pytest.raises(GrowthError, match="--grow-zero-expert-bias .* the source has no experts"):
        GrowthPlan(dense, DepthGrowth(2), init=CopyInit(zero_expert_bias=True))
    with pytest.raises(GrowthError, match="--grow-weight-multiplier .* --upcycle-experts"):
        GrowthPlan(dense, upcycle=Upcycling(experts=4, topk=2), init=CopyInit(weight_multiplier=2.0))


@pytest.mark.parametrize("init", [CopyInit(), CopyInit(weight_multiplier=0.5, random_router=True,
                                                       zero_expert_bias=True, init_std=0.01),
                                  CopyInit(from_second=True)])
def test_plan_round_trips_through_its_description(init):
    plan = GrowthPlan(MOE, DepthGrowth(2, skip_first=1), WidthGrowth(2, placement="interleave", seed=5), init=init)
    again = GrowthPlan.from_description(plan.describe())
    assert again == plan and again.layer_map == plan.layer_map and again.init == init


def test_a_record_written_before_the_copy_init_options_reads_as_their_defaults():
    described = GrowthPlan(MOE, DepthGrowth(2)).describe()
    del described["init"]
    assert GrowthPlan.from_description(described).init == CopyInit()


def test_exactness_notes_explain_what_changes_the_output():
    assert GrowthPlan(MOE, DepthGrowth(2, zero_copy_outputs=True), WidthGrowth(2, noise_alpha=0)).exactness_notes() == []
    notes = GrowthPlan(MOE, DepthGrowth(2), WidthGrowth(2)).exactness_notes()
    assert any("noise" in n for n in notes) and any("zero-init" in n for n in notes)
    notes = GrowthPlan(MOE, width=WidthGrowth(2, noise_alpha=0), init=CopyInit(
        weight_multiplier=2.0, random_router=True, zero_expert_bias=True)).exactness_notes()
    assert [n.split()[0] for n in notes] == ["copies", "routers", "expert_bias"]


# --- HybridModel patterns: blocks of symbols are copied ---------------------------------------
HYBRID = Architecture(num_layers=6, num_experts=4, topk=2, hybrid_pattern="M*EM*E/*E",
                      moe_layers=(False, False, True, False, False, True))


@pytest.mark.parametrize("pattern, blocks", [
    ("*E*E", ["*E", "*E"]),
    ("M*EM*E", ["M", "*E", "M", "*E"]),
    ("M-M-M*-", ["M-", "M-", "M", "*-"]),
    ("-*E", ["-", "*E"]),
    ("*EE*", ["*EE", "*"]),
])
def test_default_blocks_are_a_mixer_with_its_mlps(pattern, blocks):
    from megatron_recycle import hybrid

    assert hybrid.default_blocks(pattern) == blocks


def test_hybrid_depth_growth_copies_blocks_and_keeps_the_mtp_pattern():
    plan = GrowthPlan(HYBRID, DepthGrowth(2), WidthGrowth(2))
    assert plan.target.hybrid_pattern == "MM*E*EMM*E*E/*E"
    assert plan.layer_map == (0, 0, 1, 2, 1, 2, 3, 3, 4, 5, 4, 5)
    assert plan.layer_copy == (0, 1, 0, 0, 1, 1, 0, 1, 0, 0, 1, 1)
    assert plan.target.moe_layers == tuple(c == "E" for c in "MM*E*EMM*E*E")
    stacked = GrowthPlan(HYBRID, DepthGrowth(2, method="stack", skip_first=1))
    assert stacked.target.hybrid_pattern == "M*EM*E*EM*E/*E"  # block 0 kept once
    mapped = GrowthPlan(HYBRID, DepthGrowth(layer_map=(0, 1, 1, 2, 3)))  # block indices
    assert mapped.target.hybrid_pattern == "M*E*EM*E/*E"


def test_an_explicit_block_map_groups_otherwise_but_never_splits_a_mixer_from_its_mlp():
    plan = GrowthPlan(HYBRID, DepthGrowth(2, hybrid_blocks=("M*E", "M*E")))
    assert plan.target.hybrid_pattern == "M*EM*EM*EM*E/*E"
    with pytest.raises(GrowthError, match="--grow-hybrid-blocks 'M\\*,EM\\*E' splits the mixer"):
        GrowthPlan(HYBRID, DepthGrowth(2, hybrid_blocks=("M*", "EM*E")))
    with pytest.raises(GrowthError, match="does not spell the source pattern"):
        GrowthPlan(HYBRID, DepthGrowth(2, hybrid_blocks=("M*E",)))
    with pytest.raises(GrowthError, match="HybridModel checkpoints only"):
        GrowthPlan(MOE, DepthGrowth(2, hybrid_blocks=("*E",)))


def test_the_target_pattern_is_cut_into_pipeline_segments_at_block_boundaries():
    plan = GrowthPlan(HYBRID, DepthGrowth(2))
    assert plan.target_hybrid_pattern(2) == "MM*E*E|MM*E*E/*E"
    assert plan.target_hybrid_pattern(4) == "MM|*E*E|MM|*E*E/*E"  # 2,4,2,4 layers: as even as blocks allow
    plan.check_target(pipeline_parallel=4)
    with pytest.raises(GrowthError, match="--pipeline-model-parallel-size: 8 blocks .* 9 pipeline"):
        plan.check_target(pipeline_parallel=9)


def test_a_zeroed_copy_reads_nothing_of_its_source():
    """A rank holding a zeroed copy (an output projection under zero_copy_outputs) but not its
    original, as on another pipeline stage, asks the source for nothing and gets zeros."""
    import torch
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_recycle.engine import execute, prepare

    key, shapes = "decoder.layers.self_attention.linear_proj.weight", {
        "decoder.layers.self_attention.linear_proj.weight": (1, 4, 4)}
    plan = GrowthPlan(Architecture(1), DepthGrowth(2, zero_copy_outputs=True))
    copy, original = (ShardedTensor.from_rank_offsets(key, torch.ones(4, 4), (0, layer, 2), prepend_axis_num=1)
                      for layer in (1, 0))
    work = prepare(plan, shapes, [copy], "copy", set())
    assert work.request == {} and work.boxes == []
    loaded = execute(work, plan, lambda request: {}, lambda request: {})
    assert torch.equal(loaded[id(copy)], torch.zeros(4, 4))
    assert len(prepare(plan, shapes, [copy, original], "copy", set()).boxes) == 1
