"""Dense → MoE upcycling: which dense tensor every tensor of an upcycled MoE layer comes from.
Pure Python.

An upcycled layer's MLP becomes `E` experts (each the dense MLP, or with granularity G a 1/G
slice of its hidden units: expert e is slice e mod G), a zero router (uniform scores: with a
softmax after top-k every token's K weights are 1/K) and, optionally, a shared expert. So
that the layer computes exactly what the dense MLP did, the routed experts' output projections
are scaled by G, and with a shared expert both halves of the output by 1/2.

Names are the part of a key after `decoder.layers.[{i}.]` (optimizer prefixes kept):
- experts `mlp.experts.experts.linear_fc{1,2}.weight` ← dense `mlp.linear_fc{1,2}.weight`
  (a slice of its hidden units with granularity: fc1 rows, both GLU halves; fc2 columns);
- shared expert `mlp.shared_experts.linear_fc{1,2}.weight` ← dense `mlp.linear_fc{1,2}.weight`;
- `mlp.router.weight`, `mlp.router.expert_bias` ← zeros;
- the pre-MLP norm keeps its name `mlp.linear_fc1.layer_norm_{weight,bias}` in megatron-core's
  local spec, and is `pre_mlp_layernorm.{weight,bias}` in a Transformer Engine MoE layer: both
  come from the dense layer's (offline growth writes both, so either spec loads the result).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .errors import GrowthError

DENSE_FC = {"fc1": "mlp.linear_fc1.weight", "fc2": "mlp.linear_fc2.weight"}
EXPERT_FC = {"fc1": "mlp.experts.experts.linear_fc1.weight", "fc2": "mlp.experts.experts.linear_fc2.weight"}
SHARED_FC = {"fc1": "mlp.shared_experts.linear_fc1.weight", "fc2": "mlp.shared_experts.linear_fc2.weight"}
ROUTER = ("mlp.router.weight", "mlp.router.expert_bias")
NORM = {"weight": "pre_mlp_layernorm.weight", "bias": "pre_mlp_layernorm.bias"}  # a TE MoE layer's
FUSED_NORM = {"weight": "mlp.linear_fc1.layer_norm_weight",  # the local spec's and TE's dense
              "bias": "mlp.linear_fc1.layer_norm_bias"}


@dataclass(frozen=True)
class Role:
    """What a tensor of an upcycled layer is."""

    kind: str  # "expert", "shared", "router", "norm"
    fc: Optional[str] = None  # "fc1" / "fc2" for experts and the shared expert; "weight" / "bias" for the norm


def role(tail: str) -> Optional[Role]:
    """The role of an upcycled layer's tensor by its name after the layer prefix; None: a tensor
    upcycling leaves as it is (attention, its norms)."""
    for fc in ("fc1", "fc2"):
        if tail == EXPERT_FC[fc]:
            return Role("expert", fc)
        if tail == SHARED_FC[fc]:
            return Role("shared", fc)
    if tail in ROUTER:
        return Role("router")
    for part, name in NORM.items():
        if tail == name:
            return Role("norm", part)
    if ".experts." in tail or ".router." in tail or tail.startswith("mlp.shared_experts."):
        raise GrowthError(f"upcycling: the target's {tail!r} has no dense source here; only "
                          "stacked experts (mlp.experts.experts.*: the local and TE specs) without "
                          "biases are upcycled")
    return None


def dense_tail(target_role: Role, source_tails) -> str:
    """The dense tensor a role reads."""
    if target_role.kind in ("expert", "shared"):
        return DENSE_FC[target_role.fc]
    if target_role.kind == "norm":
        return NORM[target_role.fc] if NORM[target_role.fc] in source_tails else FUSED_NORM[target_role.fc]
    raise ValueError(target_role)


def target_tails(tail: str, shared_expert: bool) -> list[str]:
    """What a dense layer's tensor becomes in the upcycled layer (the router comes from nowhere)."""
    for fc, dense in DENSE_FC.items():
        if tail == dense:
            return [EXPERT_FC[fc]] + ([SHARED_FC[fc]] if shared_expert else [])
    for part, fused in FUSED_NORM.items():
        if tail == fused:
            return [tail, NORM[part]]
    return [tail]


def dense_object_tail(tail: str) -> Optional[str]:
    """The dense layer's object (`_extra_state`) an upcycled expert's or shared expert's object
    comes from; None for the objects upcycling leaves as they are."""
    for fc, dense in DENSE_FC.items():
        for made in (EXPERT_FC[fc], SHARED_FC[fc]):
            if tail == made.replace(".weight", "._extra_state"):
                return dense.replace(".weight", "._extra_state")
    return None


def object_tails(tail: str, shared_expert: bool) -> list[str]:
    """The objects a dense layer's object becomes in the upcycled layer."""
    weight = tail.replace("._extra_state", ".weight")
    if weight not in DENSE_FC.values():
        return [tail]
    return [t.replace(".weight", "._extra_state") for t in target_tails(weight, shared_expert)]


def slice_rows(fc: str, glu: bool, dense_hidden: int, granularity: int, piece: int,
               offset: int, length: int) -> int:
    """Where rows [offset, offset + length) of slice `piece`'s fc1 (or columns of its fc2) start
    in the dense tensor. GLU fc1 holds the gate half then the up half, each sliced alike."""
    hidden = dense_hidden // granularity
    if fc == "fc2" or not glu or granularity == 1:
        return piece * hidden + offset
    half = 0 if offset < hidden else 1
    if (offset + length - 1 >= hidden) != bool(half):
        raise GrowthError("upcycling with --upcycle-granularity: a target shard spans both halves of "
                          "a GLU expert's fc1, which no single dense box holds")
    return half * dense_hidden + piece * hidden + (offset - half * hidden)


def model_args(plan, dense_hidden: Optional[int]) -> dict:
    """The MoE arguments an upcycled model needs beyond num_experts / top-k / moe_layer_freq:
    its experts' size, the shared expert's, and the router upcycling is exact with."""
    up = plan.upcycle
    if not up.active:
        return {}
    out = {"moe_router_score_function": "softmax", "moe_router_pre_softmax": False}
    if dense_hidden:
        out["moe_ffn_hidden_size"] = dense_hidden // up.granularity
        if up.shared_expert:
            out["moe_shared_expert_intermediate_size"] = dense_hidden
    return out
