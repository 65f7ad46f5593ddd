"""Key layouts that CPU-buildable models do not write: TE spec (pre_mlp_layernorm, extra
state objects), MLA projections, mixed stacks with layers in keys, singleton experts (experts
in keys, GLU split into _w/_v). Source and target are ShardedTensors built by hand with
Megatron-Core's own constructors, saved sharded one way (rank splits a hidden dim) and grown
sharded another (rank splits experts), then compared with the plan written out here.

Usage: torchrun --nproc-per-node 2 key_layouts.py OUT   → OUT/report.json
"""

import sys
import zlib

import _boot

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

from megatron_recycle.plan import Architecture, DepthGrowth, GrowthPlan, WidthGrowth
from megatron_recycle.load_hook import GrowthLoadStrategy

H, F, L, E = 8, 4, 3, 4
PLAN = GrowthPlan(Architecture(num_layers=L, num_experts=E, topk=2),
                  DepthGrowth(2), WidthGrowth(2, noise_alpha=0.0))
STACKED = {  # key → per-layer shape (experts first where keyed by expert)
    "decoder.layers.self_attention.linear_qkv.weight": (3 * H, H),
    "decoder.layers.self_attention.linear_qkv.layer_norm_weight": (H,),
    "decoder.layers.self_attention.linear_proj.weight": (H, H),
    "decoder.layers.self_attention.linear_q_proj.weight": (H, H),  # MLA
    "decoder.layers.self_attention.linear_kv_down_proj.weight": (H // 2, H),
    "decoder.layers.self_attention.linear_kv_up_proj.weight": (2 * H, H // 2),
    "decoder.layers.self_attention.linear_kv_up_proj.layer_norm_weight": (H // 2,),
    "decoder.layers.pre_mlp_layernorm.weight": (H,),  # TE spec
    "decoder.layers.mlp.router.weight": (E, H),
    "decoder.layers.mlp.router.expert_bias": (E,),
}
EXPERT_STACKED = {
    "decoder.layers.mlp.experts.experts.linear_fc1.weight": (2 * F, H),
    "decoder.layers.mlp.experts.experts.linear_fc2.weight": (H, F),
    # the non-distributed optimizer's model-space state (bf16 runs keep fp32 master copies)
    "optimizer.state.fp32_param.decoder.layers.mlp.experts.experts.linear_fc2.weight": (H, F),
    "optimizer.state.exp_avg.decoder.layers.mlp.experts.experts.linear_fc2.weight": (H, F),
}
INDEXED = {  # mixed stacks / singleton local shards: indices in keys
    "decoder.layers.{l}.mlp.experts.{e}.linear_fc1.weight_w": (F, H),
    "decoder.layers.{l}.mlp.experts.{e}.linear_fc1.weight_v": (F, H),
    "decoder.layers.{l}.mlp.experts.{e}.linear_fc2.weight": (H, F),
    "decoder.layers.{l}.self_attention.linear_proj.weight": (H, H),
}


def value(key, layers, experts, shape):
    """Deterministic source content, the same on every rank."""
    gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return torch.randn((layers, experts, *shape) if experts else (layers, *shape), generator=gen)


def state(num_layers, num_experts, rank, world, split_experts):
    """A sharded state dict: hidden dim split over ranks, or experts split over ranks."""
    sd = {}

    def split(name, t, *axes, owned=False):
        """Split local dim 0 over ranks (source), or keep it whole (target)."""
        if not split_experts and t.shape[0] % world == 0:
            n = t.shape[0] // world
            sd[name] = ShardedTensor.from_rank_offsets(
                name.split("@")[0], t.narrow(0, rank * n, n).clone(), *axes,
                (len(axes), rank, world), prepend_axis_num=len(axes))
        else:  # replicated on every rank
            sd[name] = ShardedTensor.from_rank_offsets(name.split("@")[0], t.clone(), *axes,
                                                       prepend_axis_num=len(axes),
                                                       replica_id=0 if owned else rank)

    for key, shape in STACKED.items():
        rows = num_experts if key.endswith(("router.weight", "router.expert_bias")) else None
        full = value(key, L, None, shape)
        full = full[:, torch.arange(num_experts) % E] if rows else full
        for layer in range(num_layers):
            src = PLAN.layer_map[layer] if num_layers != L else layer
            split(f"{key}@{layer}", full[src], (0, layer, num_layers))
    for key, shape in EXPERT_STACKED.items():
        full = value(key, L, E, shape)
        mine = range(rank, num_experts, world) if split_experts else range(num_experts)
        for layer in range(num_layers):
            src = PLAN.layer_map[layer] if num_layers != L else layer
            for e in mine:
                axes = ((0, layer, num_layers), (1, e, num_experts))
                sd[f"{key}@{layer}.{e}"] = ShardedTensor.from_rank_offsets(
                    key, full[src, e % E].clone(), *axes, prepend_axis_num=2,
                    replica_id=0 if split_experts else rank)
            if rank == 0 and not key.startswith("optimizer."):
                obj_key = key.rsplit(".", 1)[0] + "._extra_state"
                for e in range(num_experts):
                    sd[f"{obj_key}@{layer}.{e}"] = ShardedObject(
                        obj_key, {"layer": src, "expert": e % E}, (num_layers, num_experts),
                        (layer, e), replica_id=0)
    for pattern, shape in INDEXED.items():
        for layer in range(num_layers):
            src = PLAN.layer_map[layer] if num_layers != L else layer
            for e in (range(num_experts) if "{e}" in pattern else [0]):
                key = pattern.format(l=layer, e=e)
                full = value(pattern.format(l=src, e=e % E), 1, None, shape)[0]
                owned = "{e}" in pattern and split_experts
                if not owned or e % world == rank:
                    split(key, full, owned=owned)
    return sd


def main(out):
    rank, world = _boot.init()
    root = f"{out}/src"
    if rank == 0:
        import os

        os.makedirs(root, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(state(L, E, rank, world, split_experts=False), root)
    target = state(PLAN.target_num_layers, PLAN.target_num_experts, rank, world, split_experts=True)
    expected = {name: (sh.data.clone() if isinstance(sh, ShardedTensor) else sh.data)
                for name, sh in target.items()}
    for sh in target.values():
        if isinstance(sh, ShardedTensor):
            sh.data.zero_()
    loaded = dist_checkpointing.load(target, root, GrowthLoadStrategy(PLAN))
    report = {}
    for name, want in expected.items():
        got = loaded[name]
        report[name] = bool(torch.equal(got, want)) if torch.is_tensor(want) else got == want
    _boot.report(f"{out}/report.json", report)
    _boot.finish()


if __name__ == "__main__":
    main(sys.argv[1])
