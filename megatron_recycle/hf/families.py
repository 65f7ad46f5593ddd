"""The Hugging Face model families growth knows, one table each: how a family names its MoE
tensors and where its config keeps what growth changes. Pure Python.

A family is matched by the config's `model_type`; one we do not know is refused, naming it,
because growing a tensor growth cannot place (an unknown router, experts stored another way)
would write a checkpoint that loads and computes something else.

Exactness of width growth at alpha = 0 with top-k scaled, per router (checked by the tests):
softmax routers (Qwen3-MoE, OLMoE, Mixtral, DeepSeek-V2) give each of the m copies 1/m of
its source's probability, renormalised or not; GPT-OSS's softmax over the top-k logits gives
the m copies of an expert the share the expert had; sigmoid routers (DeepSeek-V3, GLM-4.5) give
every copy its source's full score, exact with `norm_topk_prob` and made exact without it by
dividing `routed_scaling_factor` by m. DeepSeek-V3 and GLM-4.5 rank groups by the sum of the
top-2 scores in a group (fixed at 2 in transformers), which copies change: growth there is
exact only when every group is selected (`topk_group == n_group`), and says so otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import GrowthError


@dataclass(frozen=True)
class Family:
    name: str  # as users know it
    model_types: tuple[str, ...]
    experts_keys: tuple[str, ...]  # config keys of the routed-expert count, the first present wins
    moe: str = "mlp"  # the MoE block under `model.layers.{i}.`
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # gate, up, down
    dense_layers: str = "none"  # "none": every layer MoE; "first_k": first_k_dense_replace;
    # "listed": mlp_only_layers + decoder_sparse_step (Qwen)
    sigmoid: bool = False  # sigmoid router with score-correction bias (DeepSeek-V3 family)
    groups: bool = False  # n_group / topk_group routing
    group_top2: bool = False  # groups ranked by the sum of their top-2 scores
    shared_experts: bool = False
    router: str = "gate"  # the router module under the MoE block
    transposed_experts: bool = False  # fused experts stored [E, H, 2F] with gate/up columns
    # interleaved, and [E, F, H], each with a bias (GPT-OSS)
    architecture: str = ""  # the CausalLM class of a config made by upcycling
    upcycles_from: tuple[str, ...] = ()  # dense model types that upcycle into this family


FAMILIES = (
    Family("Qwen3-MoE", ("qwen3_moe",), ("num_experts", "num_local_experts"), dense_layers="listed",
           architecture="Qwen3MoeForCausalLM", upcycles_from=("qwen3",)),
    Family("OLMoE", ("olmoe",), ("num_experts", "num_local_experts")),
    Family("Mixtral", ("mixtral",), ("num_local_experts",), moe="block_sparse_moe",
           expert_names=("w1", "w3", "w2"), architecture="MixtralForCausalLM",
           upcycles_from=("mistral", "llama")),
    Family("DeepSeek-V3", ("deepseek_v3",), ("n_routed_experts",), dense_layers="first_k",
           sigmoid=True, groups=True, group_top2=True, shared_experts=True),
    Family("GLM-4.5", ("glm4_moe",), ("n_routed_experts",), dense_layers="first_k", sigmoid=True,
           groups=True, group_top2=True, shared_experts=True),
    Family("DeepSeek-V2", ("deepseek_v2",), ("n_routed_experts",), dense_layers="first_k",
           groups=True, shared_experts=True),
    Family("GPT-OSS", ("gpt_oss",), ("num_local_experts",), router="router", transposed_experts=True),
)
NOT_YET = {  # families transformers builds whose expert layout growth does not place yet
    "qwen2_moe": "Qwen2-MoE (a gated shared expert)",
}


def family_of(config: dict, flag: str = "--load") -> Family:
    model_type = config.get("model_type")
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    known = ", ".join(f.name for f in FAMILIES)
    if model_type in NOT_YET:
        raise GrowthError(f"{flag}: model_type {model_type!r} ({NOT_YET[model_type]}) is not supported "
                          f"yet; supported Hugging Face MoE families: {known}")
    dense = [f.name for f in FAMILIES if model_type in f.upcycles_from]
    if dense:
        raise GrowthError(f"{flag}: model_type {model_type!r} is a dense model; upcycle it into "
                          f"{dense[0]} with --upcycle-experts E")
    raise GrowthError(f"{flag}: model_type {model_type!r} is not a Hugging Face family megatron-recycle "
                      f"knows; supported: {known} (dense: {', '.join(dense_types())} with --upcycle-experts)")


def dense_types() -> list[str]:
    return [t for f in FAMILIES for t in f.upcycles_from]


def upcycle_target(config: dict, flag: str = "--load") -> Family:
    """The MoE family a dense model becomes by upcycling."""
    model_type = config.get("model_type")
    for family in FAMILIES:
        if model_type in family.upcycles_from:
            return family
    raise GrowthError(f"{flag}: --upcycle-experts: model_type {model_type!r} has no Hugging Face MoE "
                      f"family to upcycle into; supported dense types: {', '.join(dense_types())}")


# --- what the config says -----------------------------------------------------------------
def num_experts(family: Family, config: dict) -> int:
    for key in family.experts_keys:
        if config.get(key):
            return int(config[key])
    raise GrowthError(f"config.json has none of {family.experts_keys}: not a {family.name} MoE config")


def moe_layers(family: Family, config: dict) -> tuple[bool, ...]:
    """Per decoder layer: whether it is an MoE layer, as transformers builds it."""
    n = int(config["num_hidden_layers"])
    if family.dense_layers == "first_k":
        k = int(config.get("first_k_dense_replace") or 0)
        return tuple(i >= k for i in range(n))
    if family.dense_layers == "listed":
        dense = set(config.get("mlp_only_layers") or [])
        step = int(config.get("decoder_sparse_step") or 1)
        return tuple(i not in dense and (i + 1) % step == 0 for i in range(n))
    return (True,) * n


def grown_config(family: Family, config: dict, plan, notes: list[str]) -> dict:
    """The source config with what growth changed: layers and their per-layer lists, experts,
    top-k, the dense/MoE pattern; `notes` gets what makes the grown model inexact."""
    out = dict(config)
    target = plan.target
    out["num_hidden_layers"] = target.num_layers
    for key in ("layer_types",):  # per-layer lists grow with their layers
        if isinstance(config.get(key), list) and len(config[key]) == plan.source.num_layers:
            out[key] = [config[key][s] for s in plan.layer_map]
    key = next((k for k in family.experts_keys if k in config), family.experts_keys[0])
    out[key] = target.num_experts
    out["num_experts_per_tok"] = target.topk
    pattern = target.moe_layers or (True,) * target.num_layers
    if family.dense_layers == "first_k":
        k = pattern.index(True) if True in pattern else len(pattern)
        if any(pattern[:k]) or not all(pattern[k:]):
            raise GrowthError(
                f"{family.name} keeps its dense layers first (first_k_dense_replace), but the grown "
                f"layer pattern is {''.join('M' if m else 'D' for m in pattern)}; keep the dense layers "
                f"once at the start with --grow-skip-first {plan.source.moe_layers.index(True)}, or "
                "use --grow-depth-method interposition")
        out["first_k_dense_replace"] = k
    elif family.dense_layers == "listed":
        out["mlp_only_layers"] = [i for i, m in enumerate(pattern) if not m]
        out["decoder_sparse_step"] = 1
    elif not all(pattern):
        raise GrowthError(f"{family.name} has no dense layers, but the grown layer pattern has some")
    factor = plan.width.factor
    if factor > 1 and plan.width.topk == "scale" and family.sigmoid and not config.get("norm_topk_prob"):
        # each copy keeps its source's full sigmoid score: m copies would add it m times
        out["routed_scaling_factor"] = float(config.get("routed_scaling_factor", 1.0)) / factor
        notes.append(f"routed_scaling_factor divided by {factor} (sigmoid router without norm_topk_prob)")
    if factor > 1 and family.group_top2 and config.get("topk_group") != config.get("n_group"):
        notes.append(f"{family.name} ranks expert groups by their top-2 scores, which copies change: "
                     f"routing differs unless topk_group == n_group ({config.get('topk_group')} vs "
                     f"{config.get('n_group')})")
    return out


def upcycled_config(family: Family, config: dict, plan, dense_hidden: int) -> dict:
    """A dense config made into `family`'s MoE config (upcycling): the dense layers' MLP size
    kept for the layers left dense, the experts a 1/G slice each, a renormalised top-k over
    a zero router, so the upcycled model computes what the dense one did."""
    up = plan.upcycle
    if up.shared_expert:
        raise GrowthError(f"--upcycle-shared-expert: {family.name} has no shared expert; drop the flag")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise GrowthError(f"--upcycle-experts: the dense model has biases (attention_bias / mlp_bias), "
                          f"which {family.name} cannot hold")
    if len(set(config.get("layer_types") or ["full_attention"])) > 1:
        raise GrowthError(f"--upcycle-experts: the dense model mixes attention types (layer_types), "
                          f"which {family.name} cannot express")
    target = plan.target
    pattern = target.moe_layers or (True,) * target.num_layers
    out = {k: v for k, v in config.items() if k not in ("layer_types", "max_window_layers")}
    out.update(model_type=family.model_types[0], architectures=[family.architecture],
               num_hidden_layers=target.num_layers, num_experts_per_tok=up.topk)
    out[family.experts_keys[0]] = up.experts
    if family.dense_layers == "listed":
        out.update(moe_intermediate_size=dense_hidden // up.granularity, norm_topk_prob=True,
                   decoder_sparse_step=1, mlp_only_layers=[i for i, m in enumerate(pattern) if not m])
    else:
        if up.granularity != 1 or not all(pattern):
            raise GrowthError(f"--upcycle-granularity / --upcycle-layers: {family.name} experts are the "
                              "size of its dense MLP in every layer; drop the flags")
    return out


def routing(family: Family, config: dict) -> tuple[Optional[int], Optional[int], str]:
    """(groups, selected groups, score function) of the router, for the plan."""
    groups = int(config.get("n_group") or 1) if family.groups else 1
    if family.name == "DeepSeek-V2" and config.get("topk_method", "greedy") == "greedy":
        groups = 1
    selected = int(config.get("topk_group") or groups)
    score = "sigmoid" if family.sigmoid else "softmax"
    return (groups, selected, score) if groups > 1 else (None, None, score)
