"""Models of the offline-tool tests, shared by the test module and its rank worker (no side
effects on import)."""

from megatron_recycle.testing import toy

# A mixed dense/MoE stack: layers are indexed in the keys, unlike scenarios.SPEC.
MIXED = toy.ToySpec(num_layers=4, experts=4, topk=2, shared_expert=16, moe_layer_freq=(1, 0, 1, 0))

# Every layer MoE, but `moe_layer_freq` given as a list: megatron-core keys the layers by index.
LISTED = toy.ToySpec(num_layers=4, experts=4, topk=2, moe_layer_freq=(1, 1, 1, 1))
