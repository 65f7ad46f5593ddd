"""Models, plans and layouts the tests and their rank workers share (no side effects)."""

from megatron_recycle import toy
from megatron_recycle.plan import DepthGrowth, GrowthPlan, WidthGrowth

# grow_matrix: one source, two source layouts, six target layouts.
SPEC = toy.ToySpec(num_layers=4, experts=4, topk=2, shared_expert=16, expert_bias=True,
                   score_function="sigmoid")
PLAN = GrowthPlan(SPEC.architecture(), DepthGrowth(2), WidthGrowth(2, noise_alpha=0.01, seed=7))
SOURCES = {"s1": toy.Layout(), "s2": toy.Layout(tp=2, ep=2)}
TARGETS = {
    "tp2-pp2": (toy.Layout(tp=2, pp=2), False),
    "ep2": (toy.Layout(ep=2), False),
    "tp2-ep2": (toy.Layout(tp=2, ep=2), False),
    "ep2-fullyparallel": (toy.Layout(ep=2), True),
    "ep2-pp2-vpp2": (toy.Layout(ep=2, pp=2, vpp=2), False),
    "pp2-uneven": (toy.Layout(pp=2, first_stage_layers=3, last_stage_layers=5), False),
}
