"""`inspect`: what a checkpoint holds, from its metadata and common state (no tensor is read)."""

from __future__ import annotations

import dataclasses
import math
import re

from . import cost
from .io.checkpoint import CheckpointInfo

_MLA = re.compile(r"\.linear_(kv|q)_down_proj\.")


def attention_kind(shapes, args) -> str:
    if any(_MLA.search(k) for k in shapes):
        return "MLA"
    groups = getattr(args, "num_query_groups", None)
    heads = getattr(args, "num_attention_heads", None)
    if getattr(args, "group_query_attention", False) and groups and heads and groups < heads:
        return "MQA" if groups == 1 else f"GQA ({groups} groups)"
    return "MHA"


def key_layout(shapes) -> str:
    decoder = [k for k in shapes if k.startswith("decoder.layers.")]
    layers = "indexed in keys" if any(re.match(r"decoder\.layers\.\d+\.", k) for k in decoder) else "stacked"
    experts = ("stacked" if any(".experts.experts." in k for k in decoder)
               else "indexed in keys" if any(re.search(r"\.experts\.\d+\.", k) for k in decoder) else None)
    return f"layers {layers}" + (f", experts {experts}" if experts else "")


def summarize(path, step=None) -> dict:
    info = CheckpointInfo.read(path, step, "CKPT")
    arch = info.architecture()
    model = info.model_shapes()
    args = info.model_args
    counts = cost.count_params(model, arch.topk, arch.num_experts)
    pattern = arch.hybrid_pattern or "".join(
        "M" if m else "D" for m in (arch.moe_layers or [arch.is_moe] * arch.num_layers))
    embedding = model.get("embedding.word_embeddings.weight")
    provenance = info.provenance
    return {
        "path": str(info.path),
        "iteration": info.iteration,
        "architecture": dataclasses.asdict(arch),
        "hidden_size": getattr(args, "hidden_size", None) or (embedding[-1] if embedding else None),
        "attention": attention_kind(model, args),
        "layer_pattern": pattern,
        "key_layout": key_layout(model),
        "params": counts.total,
        "active_params": counts.active,
        "expert_params": counts.experts,
        "optimizer_format": info.optimizer_format,
        "checkpoint_bytes": sum(
            math.prod(s) * info.dtypes[k].itemsize for k, s in info.shapes.items()),
        "provenance": None if provenance is None else provenance.summary(),
        "bridge": None if info.run_config is None else bridge_view(info.run_config),
    }


def bridge_view(config: dict) -> dict:
    """What Megatron-Bridge builds from the checkpoint's run_config.yaml (its model section)."""
    from .io import run_config

    model = config["model"]
    keys = ("num_layers", "num_moe_experts", "moe_router_topk", "moe_layer_freq",
            "moe_router_score_function", "moe_router_enable_expert_bias",
            "moe_shared_expert_intermediate_size", "moe_router_num_groups", "moe_router_group_topk",
            "mtp_num_layers", "hybrid_layer_pattern", "tensor_model_parallel_size",
            "pipeline_model_parallel_size", "expert_model_parallel_size")
    return {"provider": run_config.target(model), "params_dtype": run_config.dtype_name(model.get("params_dtype")),
            **{k: model.get(k) for k in keys if k in model}}


def table(s: dict) -> str:
    a = s["architecture"]
    rows = [
        ("checkpoint", s["path"]),
        ("iteration", s["iteration"]),
        ("layers", f"{a['num_layers']} ({s['layer_pattern']}; " + (
            "HybridModel pattern)" if a["hybrid_pattern"] else "M = MoE, D = dense)")),
        ("experts / top-k", f"{a['num_experts']} / {a['topk']}" if a["num_experts"] else "dense"),
        ("router", f"{a['score_function']}" + (", pre-softmax" if a["pre_softmax"] else "")
         + (f", {a['router_num_groups']} groups top-{a['router_group_topk']}" if a["router_num_groups"] else "")),
        ("hidden size", s["hidden_size"]),
        ("attention", s["attention"]),
        ("MTP layers", a["mtp_layers"]),
        ("key layout", s["key_layout"]),
        ("parameters", cost.human(s["params"])),
        ("active parameters / token", cost.human(s["active_params"])),
        ("optimizer state", s["optimizer_format"] or "none"),
        ("checkpoint size", cost.human(s["checkpoint_bytes"], "B")),
    ]
    p = s["provenance"]
    if p is None:
        rows.append(("grown by megatron-recycle", "no"))
    back, earlier = 0, ""
    while p is not None:  # this growth, then the source's own growth, and so on
        rows += [(f"{earlier}grown from", f"{p['source']} (iteration {p['iteration']})"),
                 (f"{earlier}growth", f"depth {p['depth']}, width {p['width']}"),
                 (f"{earlier}layer map", " ".join(map(str, p["layer_map"] or []))),
                 (f"{earlier}grown with", f"megatron-recycle {p['version']} ({p['grown_by']}), "
                                          f"optimizer {p['optimizer']}")]
        if p["disagreements"]:
            rows.append((f"{earlier}growth record", "INCONSISTENT: " + "; ".join(p["disagreements"])))
        p, back = p["previous"], back + 1
        earlier = f"earlier growth {back}: "  # the growth that made the source, and before it
    bridge = s["bridge"]
    if bridge is not None:
        rows.append(("Megatron-Bridge run_config", bridge["provider"]))
        rows += [(f"  {k}", v) for k, v in bridge.items() if k != "provider"]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:{width}}  {value}" for name, value in rows)
