"""A synthetic Megatron-Core MoE state dict (real key layout, real ShardedTensors) of any size,
with experts split over ranks (EP = world size): big enough to dominate fixed costs without
building a model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor


@dataclass(frozen=True)
class MoEShape:
    layers: int
    experts: int
    hidden: int
    moe_ffn: int

    def per_layer(self) -> dict[str, tuple[int, ...]]:
        h = self.hidden
        return {
            "decoder.layers.self_attention.linear_qkv.weight": (3 * h, h),
            "decoder.layers.self_attention.linear_qkv.layer_norm_weight": (h,),
            "decoder.layers.self_attention.linear_proj.weight": (h, h),
            "decoder.layers.pre_mlp_layernorm.weight": (h,),
            "decoder.layers.mlp.router.weight": (self.experts, h),
        }

    def per_expert(self) -> dict[str, tuple[int, ...]]:
        h, f = self.hidden, self.moe_ffn
        return {
            "decoder.layers.mlp.experts.experts.linear_fc1.weight": (2 * f, h),
            "decoder.layers.mlp.experts.experts.linear_fc2.weight": (h, f),
        }

    def total_bytes(self) -> int:
        dense = sum(torch.Size(s).numel() for s in self.per_layer().values())
        expert = sum(torch.Size(s).numel() for s in self.per_expert().values())
        return 4 * self.layers * (dense + self.experts * expert)


def state_dict(shape: MoEShape, rank: int, world: int, random: bool, seed: int = 0) -> dict:
    """This rank's shards: its experts (EP = world), and a replica of every dense tensor."""
    gen = torch.Generator().manual_seed(seed + rank)

    def tensor(s):
        return torch.randn(s, generator=gen) * 0.02 if random else torch.empty(s)

    sd = {}
    for layer in range(shape.layers):
        axis = (0, layer, shape.layers)
        for key, s in shape.per_layer().items():
            if random and rank != 0:
                continue  # saved once; loaded as a replica on every rank
            sd[f"{key}/{layer}"] = ShardedTensor.from_rank_offsets(
                key, tensor(s), axis, replica_id=rank, prepend_axis_num=1)
        per_rank = shape.experts // world
        for e in range(rank * per_rank, (rank + 1) * per_rank):
            for key, s in shape.per_expert().items():
                sd[f"{key}/{layer}/{e}"] = ShardedTensor.from_rank_offsets(
                    key, tensor(s), axis, (1, e, shape.experts), prepend_axis_num=2)
    return sd


def shard_bytes(sd: dict) -> int:
    return sum(sh.data.numel() * sh.data.element_size() for sh in sd.values())
