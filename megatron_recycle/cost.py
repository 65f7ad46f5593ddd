"""What a model costs, from its checkpoint's tensor shapes alone: parameters (total and active
per token), training FLOPs per token, checkpoint bytes and memory per GPU under a layout.
`plan` puts the source and the grown model side by side before anything is grown.

Conventions (stated so the numbers can be checked by hand):
- parameters: every model tensor except known buffers (router `expert_bias`);
- active per token: all non-expert parameters + top-k / E of the routed-expert parameters;
- training FLOPs per token: 6 x active parameters without the input embedding (a lookup),
  plus attention scores and values 12 x layers x seq x (heads x head dim), as in Megatron-LM;
- memory per GPU: Megatron-LM's theoretical_memory_usage convention for bf16 training with the
  distributed optimizer, 6 bytes per parameter (bf16 weight + fp32 grad) plus 12 bytes
  (fp32 master, Adam moments) sharded over the data-parallel ranks; expert parameters are
  split over EP x expert-TP (= TP) and their optimizer over the expert data-parallel ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from . import indexing
from .errors import GrowthError
from .io.checkpoint import CheckpointInfo

BUFFERS = (".router.expert_bias",)


@dataclass(frozen=True)
class Counts:
    total: int
    experts: int  # routed-expert parameters
    embedding: int  # input embedding (a lookup, no FLOPs)
    output: int  # output layer, final norm and MTP: outside the decoder stack
    active: Optional[int]  # None: top-k unknown (no args in the common state)


def count_params(shapes: dict[str, tuple[int, ...]], topk: Optional[int], num_experts: Optional[int]) -> Counts:
    total = experts = embedding = output = 0
    for key, shape in shapes.items():
        if key.startswith("optimizer.") or key.endswith(BUFFERS):
            continue
        n = math.prod(shape)
        total += n
        if indexing.parse_key(key, 2).has_expert_index:
            experts += n
        elif key.startswith("embedding."):
            embedding += n
        elif not key.startswith("decoder.layers."):
            output += n
    if not experts:
        active = total
    else:
        active = None if topk is None else total - experts + experts * topk // num_experts
    return Counts(total, experts, embedding, output, active)


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    ep: int = 1
    pp: int = 1
    dp: Optional[int] = None
    gpus: Optional[int] = None

    def data_parallel(self) -> int:
        if self.gpus is None:
            return self.dp or 1
        if self.gpus % (self.tp * self.pp):
            raise GrowthError(f"--gpus {self.gpus} is not a multiple of tp x pp = {self.tp * self.pp}")
        dp = self.gpus // (self.tp * self.pp)
        if self.dp is not None and self.dp != dp:
            raise GrowthError(f"--dp {self.dp} contradicts --gpus {self.gpus} / (tp x pp) = {dp}")
        return dp


def check_layout(layout: Layout, plan, args) -> None:
    """Refuse a target layout Megatron would refuse, naming the flag: TP must divide the
    attention heads and query groups, PP must leave every stage a layer, EP must divide the
    data-parallel size it is carved from (expert TP = TP); EP dividing the experts is the plan's."""
    heads = getattr(args, "num_attention_heads", None)
    groups = getattr(args, "num_query_groups", None) if getattr(args, "group_query_attention", False) else None
    for count, what in ((heads, "attention heads"), (groups, "query groups")):
        if isinstance(count, int) and count > 0 and count % layout.tp:
            raise GrowthError(f"--tp {layout.tp} does not divide the {count} {what} of the model; "
                              f"pick a divisor of {count}")
    if layout.pp > plan.target_num_layers:
        raise GrowthError(f"--pp {layout.pp} exceeds the {plan.target_num_layers} layers after growth; "
                          "every pipeline stage needs a layer")
    dp = layout.data_parallel()
    if (layout.dp is not None or layout.gpus is not None) and dp % layout.ep:
        raise GrowthError(f"--ep {layout.ep} does not divide the data-parallel size {dp} (expert "
                          "parallelism splits the data-parallel ranks); change --ep, --dp or --gpus")


def model_cost(shapes, dtypes, arch, args, layout: Layout) -> dict:
    counts = count_params(shapes, arch.topk, arch.num_experts)
    out = {"params": counts.total, "active_params": counts.active, "expert_params": counts.experts}
    seq = getattr(args, "seq_length", None)
    heads = getattr(args, "num_attention_heads", None)
    head_dim = getattr(args, "kv_channels", None) or (
        getattr(args, "hidden_size", 0) // heads if heads else None)
    attention = 12 * arch.num_layers * seq * heads * head_dim if seq and heads and head_dim else None
    known = attention is not None and counts.active is not None
    out["train_flops_per_token"] = 6 * (counts.active - counts.embedding) + attention if known else None
    out["checkpoint_bytes"] = sum(math.prod(s) * dtypes[k].itemsize for k, s in shapes.items())
    out.update(_memory(counts, arch, layout))
    return out


def _memory(counts: Counts, arch, layout: Layout) -> dict:
    dp = layout.data_parallel()
    if dp % layout.ep or (arch.num_experts and arch.num_experts % layout.ep):
        return {"gpu_weight_bytes": None, "gpu_train_bytes": None}
    layers_share = math.ceil(arch.num_layers / layout.pp) / arch.num_layers
    decoder_dense = counts.total - counts.experts - counts.embedding - counts.output
    ends = counts.embedding + counts.output if layout.pp == 1 else max(counts.embedding, counts.output)
    dense = (decoder_dense * layers_share + ends) / layout.tp
    experts = counts.experts * layers_share / (layout.tp * layout.ep)
    expert_dp = dp // layout.ep
    return {
        "gpu_weight_bytes": round(2 * (dense + experts)),
        "gpu_train_bytes": round(dense * (6 + 12 / dp) + experts * (6 + 12 / expert_dp)),
    }


def plan_report(source, growth, layout: Layout, step=None) -> dict:
    """`growth`: an `options.Growth`."""
    from .manifest import keeps_optimizer, target_tensors

    info = CheckpointInfo.read(source, step)
    plan = growth.plan(info.architecture())
    check_layout(layout, plan, info.args)
    plan.check_target(expert_parallel=layout.ep, pipeline_parallel=layout.pp)
    grown = target_tensors(info, plan)
    src_shapes = info.shapes if keeps_optimizer(info) else info.model_shapes()
    before = model_cost(src_shapes, info.dtypes, plan.source, info.model_args, layout)
    after = model_cost({k: s for k, (s, _) in grown.items()}, {k: d for k, (_, d) in grown.items()},
                       plan.target, info.model_args, layout)
    return {
        "source": str(info.path),
        "layout": {"tp": layout.tp, "ep": layout.ep, "pp": layout.pp, "dp": layout.data_parallel()},
        "before": before,
        "after": after,
        "layers": [plan.source.num_layers, plan.target_num_layers],
        "experts": [plan.source.num_experts, plan.target_num_experts],
        "topk": [plan.source.topk, plan.target_topk],
        "layer_map": list(plan.layer_map),
        "expert_map": [list(x) for x in plan.expert_map()],
        "hybrid_pattern": None if not plan.source.is_hybrid else [
            plan.source.hybrid_pattern, plan.target_hybrid_pattern(layout.pp)],
        "notes": plan.exactness_notes(),
    }


def human(n, unit="") -> str:
    if n is None:
        return "n/a"
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n}{unit}"


def table(report: dict) -> str:
    b, a = report["before"], report["after"]
    lay = report["layout"]
    rows = [
        ("layers", *report["layers"]), ("experts", *report["experts"]), ("top-k", *report["topk"]),
        ("parameters", human(b["params"]), human(a["params"])),
        ("active parameters / token", human(b["active_params"]), human(a["active_params"])),
        ("training FLOPs / token", human(b["train_flops_per_token"]), human(a["train_flops_per_token"])),
        ("checkpoint size", human(b["checkpoint_bytes"], "B"), human(a["checkpoint_bytes"], "B")),
        ("weights / GPU (bf16)", human(b["gpu_weight_bytes"], "B"), human(a["gpu_weight_bytes"], "B")),
        ("weights+grads+optimizer / GPU", human(b["gpu_train_bytes"], "B"), human(a["gpu_train_bytes"], "B")),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"source: {report['source']}",
             f"target layout: TP{lay['tp']} EP{lay['ep']} PP{lay['pp']} DP{lay['dp']}",
             f"{'':{width}}  {'before':>12}  {'after':>12}"]
    lines += [f"{name:{width}}  {str(x):>12}  {str(y):>12}" for name, x, y in rows]
    if report["hybrid_pattern"]:
        lines.append("hybrid layer pattern: {} -> {}".format(*report["hybrid_pattern"]))
    lines.append("layer map (target <- source): " + _listed(
        [f"{t}<-{s}" for t, s in enumerate(report["layer_map"])]))
    if report["expert_map"]:
        lines.append("expert map (target <- source.copy): " + _listed(
            [f"{t}<-{s}.{c}" for t, (s, c) in enumerate(report["expert_map"])]))
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def _listed(entries: list[str], ends: int = 32) -> str:
    """A map's entries on one line; a long one by its first and last `ends` (--json has all)."""
    if len(entries) <= 3 * ends:
        return " ".join(entries)
    return " ".join(entries[:ends] + [f"... ({len(entries)} in all; --json lists them) ..."] + entries[-ends:])
