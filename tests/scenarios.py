"""Models, plans and layouts the tests and their rank workers share (no side effects)."""

from megatron_recycle.testing import toy
from megatron_recycle.plan import CopyInit, DepthGrowth, GrowthPlan, WidthGrowth

# grow_matrix: one source, two source layouts, six target layouts.
SPEC = toy.ToySpec(num_layers=4, experts=4, topk=2, shared_expert=16, expert_bias=True,
                   score_function="sigmoid")
PLAN = GrowthPlan(SPEC.architecture(), DepthGrowth(2), WidthGrowth(2, noise_alpha=0.01, seed=7))
# The same growth with the paper authors' options: copies x 0.5, expert copies drawn afresh
# (TP-sharded expert units: the draws must not depend on the layout), expert bias zeroed.
COPY_INIT_PLAN = GrowthPlan(SPEC.architecture(), DepthGrowth(2), WidthGrowth(2, noise_alpha=0.01, seed=7),
                            init=CopyInit(weight_multiplier=0.5, reinit_expert_copies=True, zero_expert_bias=True))
# The same growth with the expert copies from a second checkpoint (--grow-from-second).
SECOND_PLAN = GrowthPlan(SPEC.architecture(), DepthGrowth(2), WidthGrowth(2, noise_alpha=0.01, seed=7),
                         init=CopyInit(from_second=True))
SOURCES = {"s1": toy.Layout(), "s2": toy.Layout(tp=2, ep=2)}
TARGETS = {
    "tp2-pp2": (toy.Layout(tp=2, pp=2), False),
    "ep2": (toy.Layout(ep=2), False),
    "tp2-ep2": (toy.Layout(tp=2, ep=2), False),
    "ep2-fullyparallel": (toy.Layout(ep=2), True),
    "ep2-pp2-vpp2": (toy.Layout(ep=2, pp=2, vpp=2), False),
    "pp2-uneven": (toy.Layout(pp=2, first_stage_layers=3, last_stage_layers=5), False),
}

# function_preservation: (source spec, plan with alpha = 0, source layout, target layout).
EXACT = WidthGrowth(2, noise_alpha=0.0)
IDENTITY_DEPTH = DepthGrowth(2, zero_copy_outputs=True)
_DP2, _EP2 = toy.Layout(), toy.Layout(ep=2)


def _case(spec, depth=DepthGrowth(), width=EXACT, source=_DP2, target=_EP2):
    return spec, GrowthPlan(spec.architecture(), depth, width), source, target


PRESERVATION_CASES = {
    "softmax_after_topk": _case(toy.ToySpec()),
    "softmax_before_topk": _case(toy.ToySpec(pre_softmax=True)),
    "sigmoid_normalized_expert_bias": _case(toy.ToySpec(score_function="sigmoid", expert_bias=True)),
    "depth_interposition_zero_init": _case(toy.ToySpec(), IDENTITY_DEPTH, WidthGrowth()),
    "depth_stack_and_width_shared_expert_non_glu": _case(
        toy.ToySpec(glu=False, shared_expert=16),
        DepthGrowth(2, method="stack", zero_copy_outputs=True)),
    "mixed_dense_moe": _case(toy.ToySpec(moe_layer_freq=(1, 0, 1, 0)), IDENTITY_DEPTH),
    "group_limited_interleave": _case(
        toy.ToySpec(router_groups=2, router_group_topk=1),
        width=WidthGrowth(2, placement="interleave", noise_alpha=0.0)),
    "mtp_layer": _case(toy.ToySpec(mtp_layers=1), IDENTITY_DEPTH),
    "skip_first_last_layer_map": _case(
        toy.ToySpec(), DepthGrowth(2, skip_first=1, skip_last=1, zero_copy_outputs=True)),
}

# Controls: the same comparison must see these change the output.
CHANGING_CASES = {
    "noise_alpha_0.01": _case(toy.ToySpec(), width=WidthGrowth(2, noise_alpha=0.01)),
    "depth_copies_not_zeroed": _case(toy.ToySpec(), DepthGrowth(2), WidthGrowth()),
}

# hybrid_growth (megatron-core 0.19+ HybridModel): patterns with and without Mamba, a dense
# MLP layer and MTP; depth x2 by blocks (a mixer with its MLPs), experts x2.
HYBRID_SPECS = {
    "attention_moe": toy.ToySpec(hybrid_pattern="*E*E", experts=4, topk=2),
    "mamba": toy.ToySpec(hybrid_pattern="M*EM*E", experts=4, topk=2),
    "dense_and_mtp": toy.ToySpec(hybrid_pattern="*-*E/*E", experts=4, topk=2),
}
HYBRID_NOISY = WidthGrowth(2, noise_alpha=0.01, seed=7)
HYBRID_TARGETS = {"ep2": toy.Layout(ep=2), "pp2": toy.Layout(pp=2)}

# upcycling: a dense GPT (4 layers, GLU FFN 64) → MoE, exact at alpha 0 (softmax after top-k).
from megatron_recycle.plan import Upcycling  # noqa: E402

DENSE = toy.ToySpec(num_layers=4, experts=None, ffn=64)
UPCYCLE_CASES = {  # name → (depth, upcycling)
    "every_layer": (DepthGrowth(), Upcycling(experts=4, topk=2)),
    "granular_each_slice_once": (DepthGrowth(), Upcycling(experts=4, topk=4, granularity=4)),
    "shared_expert": (DepthGrowth(), Upcycling(experts=4, topk=2, shared_expert=True)),
    "some_layers_with_depth": (DepthGrowth(2, zero_copy_outputs=True),
                               Upcycling(experts=4, topk=2, layers=(True, False, True, False))),
}
UPCYCLE_LAYOUTS = {"ep2": toy.Layout(ep=2), "dp2": toy.Layout()}
UPCYCLE_EXACT, UPCYCLE_NOISY = WidthGrowth(noise_alpha=0.0), WidthGrowth(noise_alpha=0.01, seed=7)

# fsdp_dtensor (Megatron-FSDP's checkpoint format) sources: GLU experts and a GLU shared expert
# (the SwiGLU `_w`/`_v` split), expert bias, at EP2 (expert keys rewritten per global expert).
FSDP_SPEC = toy.ToySpec(num_layers=2, experts=4, topk=2, shared_expert=16, expert_bias=True,
                        score_function="sigmoid")
FSDP_PLAN = GrowthPlan(FSDP_SPEC.architecture(), DepthGrowth(2), WidthGrowth(2, noise_alpha=0.01, seed=7))
FSDP_EXACT_PLAN = GrowthPlan(FSDP_SPEC.architecture(), IDENTITY_DEPTH, EXACT)  # logits kept

# legacy_torch: Megatron-LM's --ckpt-format torch files at TP x PP (uneven stages), TP x EP and
# (a mixed dense/MoE stack: layers keyed by number) PP x VPP x EP, with a torch_dist checkpoint
# of the same model beside each.
LEGACY_SPEC = toy.ToySpec()
LEGACY_SOURCES = {"tp2-pp2": (LEGACY_SPEC, toy.Layout(tp=2, pp=2, first_stage_layers=1, last_stage_layers=3)),
                  "tp2-ep2": (LEGACY_SPEC, toy.Layout(tp=2, ep=2)),
                  "pp2-vpp2-ep2-mixed": (toy.ToySpec(moe_layer_freq=(1, 0, 1, 0)), toy.Layout(pp=2, vpp=2, ep=2))}
LEGACY_EXACT_PLAN = GrowthPlan(LEGACY_SPEC.architecture(), IDENTITY_DEPTH, EXACT)
